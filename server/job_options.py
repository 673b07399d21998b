"""What a job request may ask for: a typed option schema, bounded by the admin's policy.

A partner's ``CreateJob`` is untrusted input. Every key of ``spec.train_config`` and
``spec.options`` must be in the schema below (unknown keys are refused, naming them), every
value has a type and a range, and the engine, rounds, client counts and timeouts stay
within the :class:`JobPolicy` the admin sets in the server config. Nothing in a request
becomes a path: the Flower app, FLWR_HOME, shards and the candidate directory are derived
under the data dir by the job runner (see :func:`deployment_paths`).

The job runner validates the stored spec again before it runs (a row written by an older
server, or straight into the database, gets no free pass).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .federation_config import FederationConfig

PYTHON_REFERENCE = "python-reference"
_SCHEME_RE = re.compile(r"^[A-Za-z0-9:,._+-]{1,256}$")


@dataclass
class JobPolicy:
    """Bounds the admin sets on jobs (``ServerConfig.job_policy``); requests cannot widen them."""

    engines: tuple[str, ...] = ("simulation", "deployment")
    max_rounds: int = 100
    max_min_clients: int = 1000
    max_clients: int = 8  # simulated data owners the server runs itself
    default_round_timeout_s: float = 600.0
    max_round_timeout_s: float = 3600.0
    max_job_timeout_s: float = 24 * 3600.0
    superlink: str = "offsite"  # the connection name in FLWR_HOME/config.toml
    flwr_home: Path | None = None  # default DATA_DIR/flwr-home (deploy/local writes one)

    def job_timeout_s(self, options: dict, rounds: int) -> float:
        """The longest a job may run: its own job_timeout, else rounds x round timeout + 10 min, capped."""
        asked = options.get("job_timeout")
        if asked is None:
            asked = rounds * float(options.get("round_timeout", self.default_round_timeout_s)) + 600.0
        return min(float(asked), self.max_job_timeout_s)


JOB_POLICY_FILE = "job-policy.json"  # in the data dir: the admin's bounds for `offsite-admin serve`


def load_job_policy(path: Path) -> JobPolicy:
    """The admin's :class:`JobPolicy` from a JSON file; unknown fields and bad values are refused."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{Path(path).name}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{Path(path).name}: a job policy is a JSON object")
    known = {f.name: f for f in fields(JobPolicy)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{Path(path).name}: unknown field(s) {unknown}; known: {sorted(known)}")
    values: dict = {}
    for name, value in raw.items():
        if name == "engines":
            if not isinstance(value, list) or not set(value) <= {"simulation", "deployment"} or not value:
                raise ValueError(f"{Path(path).name}: engines is a non-empty list of simulation, deployment")
            values[name] = tuple(value)
        elif name in ("superlink", "flwr_home"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{Path(path).name}: {name} is a non-empty string")
            values[name] = Path(value) if name == "flwr_home" else value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{Path(path).name}: {name} must be a positive number")
            values[name] = value
    return JobPolicy(**values)


@dataclass(frozen=True)
class Opt:
    kind: type
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    pattern: re.Pattern | None = None
    help: str = ""


# Client training settings (sent to every data owner each round).
TRAIN_OPTIONS: dict[str, Opt] = {
    "steps": Opt(int, 1, 100_000, help="local steps per round (alias of local_steps)"),
    "local_steps": Opt(int, 1, 100_000),
    "lr": Opt(float, 1e-9, 1.0),
    "batch_size": Opt(int, 1, 1024),
    "block_size": Opt(int, 8, 8192),
    "scheme": Opt(str, pattern=_SCHEME_RE, help="sparse-update scheme, e.g. top:full,bottom:norms"),
    "seed": Opt(int, 0, 2**31 - 1),
    "eval_fraction": Opt(float, 0.0, 0.5),
}

# Federation settings. Limits that depend on the admin's policy are filled in by `_bounds`.
JOB_OPTIONS: dict[str, Opt] = {
    "clients": Opt(int, 1, None, help="simulated data owners (simulation engine)"),
    "corpus": Opt(str, choices=(PYTHON_REFERENCE,), help="the simulation's data; server paths are not accepted"),
    "round_timeout": Opt(float, 1.0, None, help="seconds to wait for replies in a round"),
    "job_timeout": Opt(float, 1.0, None, help="seconds the whole job may run"),
    "heldout_limit": Opt(int, 0, 1_000_000),
    "eval_every": Opt(int, 1, 10_000),
    "norm_bound": Opt(float, 0.0, 1e6),
    "dp_noise_multiplier": Opt(float, 0.0, 100.0),
    "dp_clipping_norm": Opt(float, 0.0, 1e6),
    "dp_delta": Opt(float, 0.0, 0.1),
    "dp_population": Opt(int, 0, 10_000_000),
    "secagg": Opt(bool),
    "secagg_shares": Opt(float, 0.0, 1e6),
    "secagg_threshold": Opt(float, 0.0, 1.0),
    "secagg_clipping_range": Opt(float, 1e-6, 1e6),
    "secagg_max_weight": Opt(float, 1.0, 1e12),
}
# Options the job runner consumes itself; the rest become FederationConfig fields.
_RUNNER_ONLY = ("clients", "corpus", "job_timeout")


def _bounds(name: str, opt: Opt, policy: JobPolicy) -> Opt:
    hi = {
        "clients": policy.max_clients,
        "round_timeout": policy.max_round_timeout_s,
        "job_timeout": policy.max_job_timeout_s,
    }.get(name, opt.hi)
    return Opt(opt.kind, opt.lo, hi, opt.choices, opt.pattern, opt.help)


def _check_value(where: str, name: str, value: Any, opt: Opt) -> Any:
    label = f"{where}.{name}"
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be true or false")
        return value
    if opt.kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{label} must be a string")
        if opt.choices and value not in opt.choices:
            raise ValueError(f"{label} must be one of {', '.join(opt.choices)} (server paths are not accepted)")
        if opt.pattern is not None and not opt.pattern.match(value):
            raise ValueError(f"{label}: use 1-256 letters, digits and : , . _ + -")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number")
    if opt.kind is int:
        if float(value) != int(value):
            raise ValueError(f"{label} must be a whole number")
        value = int(value)
    else:
        value = float(value)
    if (opt.lo is not None and value < opt.lo) or (opt.hi is not None and value > opt.hi):
        raise ValueError(f"{label} must be between {opt.lo:g} and {opt.hi:g} (the server's job policy)")
    return value


def _check_section(where: str, raw: Any, schema: dict[str, Opt], policy: JobPolicy) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of option names to values")
    unknown = sorted(k for k in raw if k not in schema)
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ValueError(
            f"unknown {where} option(s): {shown}; allowed: {', '.join(schema)} "
            "(paths and commands are set by the server, not the request)"
        )
    return {k: _check_value(where, k, v, _bounds(k, schema[k], policy)) for k, v in raw.items()}


def validate_spec(
    *,
    emulator_id: str,
    rounds: int,
    min_clients: int,
    fraction: float,
    engine: str,
    train_config: Any,
    options: Any,
    policy: JobPolicy,
) -> dict:
    """The job spec to store, or ValueError naming the first bad field and its bounds."""
    rounds = int(rounds or 3)
    min_clients = int(min_clients or 2)
    fraction = float(fraction or 1.0)
    engine = engine or "deployment"
    if not 1 <= rounds <= policy.max_rounds:
        raise ValueError(f"spec.rounds must be between 1 and {policy.max_rounds} (the server's job policy)")
    if not 1 <= min_clients <= policy.max_min_clients:
        raise ValueError(f"spec.min_clients must be between 1 and {policy.max_min_clients} (the server's job policy)")
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError("spec.fraction must be in (0, 1]")
    if engine not in policy.engines:
        raise ValueError(
            f"spec.engine {engine[:32]!r} is not one of {', '.join(policy.engines)} (the server's job policy)"
        )
    train = _check_section("train_config", train_config, TRAIN_OPTIONS, policy)
    opts = _check_section("options", options, JOB_OPTIONS, policy)
    if "steps" in train and "local_steps" in train:
        raise ValueError("train_config: set steps or local_steps, not both")
    if engine == "simulation" and opts.get("clients", min_clients) < min_clients:
        raise ValueError(f"options.clients ({opts['clients']}) is below spec.min_clients ({min_clients})")
    spec = {
        "emulator_id": emulator_id,
        "rounds": rounds,
        "min_clients": min_clients,
        "fraction": fraction,
        "engine": engine,
        "train_config": train,
        "options": opts,
    }
    _check_federation_config(spec)
    return spec


def validate_stored_spec(spec: dict, policy: JobPolicy) -> dict:
    """Re-check a spec read from the registry before a job runs (same rules as CreateJob)."""
    return validate_spec(
        emulator_id=str(spec.get("emulator_id", "")),
        rounds=spec.get("rounds", 0),
        min_clients=spec.get("min_clients", 0),
        fraction=spec.get("fraction", 0.0),
        engine=spec.get("engine", ""),
        train_config=spec.get("train_config"),
        options=spec.get("options"),
        policy=policy,
    )


def federation_overrides(spec: dict) -> dict:
    """FederationConfig fields from a validated spec (never a path: those come from the data dir)."""
    out = {k: v for k, v in (spec.get("options") or {}).items() if k not in _RUNNER_ONLY}
    for k, v in (spec.get("train_config") or {}).items():
        out["local_steps" if k == "steps" else k] = v
    return out


def _check_federation_config(spec: dict) -> None:
    """Cross-field rules (DP needs a clipping norm, DP and SecAgg+ exclude each other ...)."""
    FederationConfig(
        job_id="check",
        model="check",
        bundle="check",
        bundle_digest="check",
        job_dir="check",
        rounds=spec["rounds"],
        min_clients=spec["min_clients"],
        fraction=spec["fraction"],
        **federation_overrides(spec),
    )


@dataclass(frozen=True)
class DeploymentPaths:
    app_dir: Path
    flwr_home: Path
    superlink: str


def deployment_paths(data_dir: Path, policy: JobPolicy) -> DeploymentPaths:
    """Where the deployment engine's files live: under the data dir, or where the admin said."""
    data_dir = Path(data_dir)
    return DeploymentPaths(
        app_dir=data_dir / "flower-app",
        flwr_home=Path(policy.flwr_home or data_dir / "flwr-home"),
        superlink=policy.superlink,
    )
