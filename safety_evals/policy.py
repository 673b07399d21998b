"""Gate policy: thresholds that turn metric values into Low/Medium/High/Critical.

The documented defaults live in ``policies/default.yaml``; a policy file given by the user
is validated field by field so a typo fails loudly instead of silently loosening the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

LEVELS = ("Low", "Medium", "High", "Critical")
DEFAULT_POLICY_PATH = Path(__file__).parent / "policies" / "default.yaml"


class PolicyError(ValueError):
    """A policy file is malformed; the message names the field."""


def level_index(level: str) -> int:
    try:
        return LEVELS.index(level)
    except ValueError:
        raise PolicyError(f"level {level!r} unknown; use one of {', '.join(LEVELS)}") from None


@dataclass
class MetricPolicy:
    absolute: dict[str, float | None]
    regression: dict[str, float | None]
    mode: str = "difference"  # how regression is measured: difference or ratio (candidate/base)


@dataclass
class Policy:
    deployable_level: str = "Medium"
    require_full_run: bool = True
    required_categories: list[str] = field(default_factory=list)
    bootstrap_resamples: int = 1000
    metrics: dict[str, MetricPolicy] = field(default_factory=dict)
    source: str = "default"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "deployable_level": self.deployable_level,
            "require_full_run": self.require_full_run,
            "required_categories": list(self.required_categories),
            "bootstrap_resamples": self.bootstrap_resamples,
            "metrics": {
                k: {"mode": m.mode, "absolute": m.absolute, "regression": m.regression} for k, m in self.metrics.items()
            },
        }


def policy_from_dict(spec: dict, source: str = "<dict>") -> Policy:
    if not isinstance(spec, dict):
        raise PolicyError(f"{source}: a policy is a mapping")
    known = {"deployable_level", "require_full_run", "required_categories", "bootstrap_resamples", "metrics", "source"}
    unknown = set(spec) - known
    if unknown:
        raise PolicyError(f"{source}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    deployable = str(spec.get("deployable_level", "Medium"))
    level_index(deployable)
    metrics: dict[str, MetricPolicy] = {}
    for name, m in (spec.get("metrics") or {}).items():
        if not isinstance(m, dict):
            raise PolicyError(f"{source}: metrics.{name} must be a mapping with absolute/regression")
        mode = m.get("mode", "difference")
        if mode not in ("difference", "ratio"):
            raise PolicyError(f"{source}: metrics.{name}.mode {mode!r}: use difference or ratio")
        tables = {}
        for kind in ("absolute", "regression"):
            table = m.get(kind) or {}
            for lvl, v in table.items():
                if lvl not in LEVELS[1:]:
                    raise PolicyError(f"{source}: metrics.{name}.{kind} has level {lvl!r}; use Medium, High, Critical")
                if v is not None and not isinstance(v, (int, float)):
                    raise PolicyError(f"{source}: metrics.{name}.{kind}.{lvl} must be a number or null")
            tables[kind] = {lvl: (None if table.get(lvl) is None else float(table[lvl])) for lvl in LEVELS[1:]}
        metrics[name] = MetricPolicy(absolute=tables["absolute"], regression=tables["regression"], mode=mode)
    return Policy(
        deployable_level=deployable,
        require_full_run=bool(spec.get("require_full_run", True)),
        required_categories=list(spec.get("required_categories") or []),
        bootstrap_resamples=int(spec.get("bootstrap_resamples", 1000)),
        metrics=metrics,
        source=str(spec.get("source", source)),
    )


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy at `path`, or the default policy."""
    p = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"{p}: no such policy file; omit --policy for the default ({DEFAULT_POLICY_PATH})") from None
    except yaml.YAMLError as e:
        raise PolicyError(f"{p}: not valid YAML ({e})") from None
    return policy_from_dict(spec, source=str(p) if path else "default")


def as_policy(policy: "Policy | dict | str | Path | None") -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return policy_from_dict(policy)
    return load_policy(policy)


def metric_level(
    metric: str, higher_is_better: bool, candidate: float, base: float, policy: Policy
) -> tuple[str, list[str]]:
    """Level of one suite's result and the reasons (which thresholds were crossed)."""
    mp = policy.metrics.get(metric)
    if mp is None:
        raise PolicyError(f"the policy has no thresholds for metric {metric!r}; add metrics.{metric} to it")
    level, reasons = 0, []
    for i, lvl in enumerate(LEVELS[1:], start=1):
        t = mp.absolute.get(lvl)
        if t is not None and (candidate < t if higher_is_better else candidate > t):
            level = max(level, i)
            reasons.append(f"{metric}={candidate:.4g} {'<' if higher_is_better else '>'} {lvl} bar {t:g}")
    for i, lvl in enumerate(LEVELS[1:], start=1):
        t = mp.regression.get(lvl)
        if t is None:
            continue
        if mp.mode == "ratio":
            worse = (
                (base / candidate if higher_is_better else candidate / base)
                if min(candidate, base) > 0
                else float("inf")
            )
            crossed, shown = worse > t, f"ratio {worse:.4g}"
        else:
            worse = (base - candidate) if higher_is_better else (candidate - base)
            crossed, shown = worse > t, f"worse than base by {worse:.4g}"
        if crossed:
            level = max(level, i)
            reasons.append(f"{metric} {shown} > {lvl} regression bar {t:g}")
    return LEVELS[level], reasons
