"""The privacy-utility dial: pick an emulator configuration by the protection it measured.

`frontier.json` (shipped beside this module, written by `python -m bench.offsite_quality
--frontier emulators/frontier.json`) holds, per base model, the configurations the
emulator-quality bench charted: the build options of each, the plug-in's share of the
adapter ceiling's gain (transfer), and its protection against three data owners on two
held-out sets (see bench/protection.py):

- owners: `recipe` (adapter only), `recalibrated` (adapter + norms + logit temperature),
  `full_finetune` (every weight of the dequantized bundle: the strongest);
- sets: `own_domain` (the data owner's held-out topics) and `general` (general English it
  never trained on: what the model owner protects is the model's general capability).

Protection = that owner's emulator perplexity / the product's (plug-in) perplexity; the
dial's default reads it against the strongest owner on general text. `pick` returns the
configuration with the most transfer among those at or above the asked protection, or
an error naming the range the frontier reaches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FRONTIER_FILE = Path(__file__).with_name("frontier.json")
OWNERS = ("recipe", "recalibrated", "full_finetune")
HELD_OUT = ("own_domain", "general")
OWNER_WORDS = {
    "recipe": "a data owner who trains the adapter only (the recipe)",
    "recalibrated": "a data owner who also retrains every norm and a logit temperature",
    "full_finetune": "a data owner who fine-tunes every weight of the dequantized bundle",
}
# Build options that change what the emulator gives away; a bundle matches a frontier
# point when these agree (absent ones take BuildConfig's defaults).
PROTECTION_KEYS = (
    "adapter_layers",
    "emulator_layers",
    "kept",
    "quantize",
    "awq",
    "awq_alpha",
    "block_bits",
    "group_size",
    "distill_steps",
    "prune_fraction",
    "elevate_margin",
    "elevate_steps",
    "share_unique",
)


class FrontierError(ValueError):
    """A protection the frontier cannot give, or a model it has not measured."""


@dataclass(frozen=True)
class FrontierPoint:
    config: str
    build: dict  # BuildConfig fields
    plugin_share: float
    protection: dict  # owner -> held-out set -> ratio
    seeds: list = field(default_factory=lambda: [0])

    def against(self, owner: str = "full_finetune", held_out: str = "general") -> float:
        return float(self.protection[owner][held_out])


@dataclass(frozen=True)
class Frontier:
    model: str
    points: list[FrontierPoint]
    measured: dict  # protocol, held-out sets, command, date, machine load
    named: str | None = None  # the named default configuration (the bench's --named)

    def point(self, name: str) -> FrontierPoint:
        for p in self.points:
            if p.config == name:
                return p
        raise FrontierError(
            f"{self.model}: no configuration {name!r} on the frontier; known: {', '.join(p.config for p in self.points)}"
        )

    def named_build_options(self) -> dict:
        """The lossy build options of the named default configuration, as BuildConfig fields."""
        if not self.named:
            raise FrontierError(f"the measured frontier of {self.model} names no default configuration")
        options = dict(self.point(self.named).build)
        if options.get("block_bits"):
            options["block_bits"] = {int(k): int(v) for k, v in options["block_bits"].items()}
        return options


def load_frontier(model: str = "smollm2-135m", path: str | Path | None = None) -> Frontier:
    path = Path(path) if path else FRONTIER_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FrontierError(
            f"{path}: no measured frontier is installed; run `python -m bench.offsite_quality --frontier {path}`"
        ) from None
    models = data.get("models", {})
    if model not in models:
        known = ", ".join(sorted(models)) or "none"
        raise FrontierError(
            f"no measured frontier for model {model!r}; the dial knows: {known} "
            "(build with explicit --quantize/--awq/... options instead)"
        )
    entry = models[model]
    points = [
        FrontierPoint(p["config"], p["build"], p["plugin_share"], p["protection"], p.get("seeds", [0]))
        for p in entry["points"]
    ]
    return Frontier(model, points, entry.get("measured", {}), entry.get("named"))


def _check(owner: str, held_out: str) -> None:
    if owner not in OWNERS:
        raise FrontierError(f"unknown data owner {owner!r}; choose one of {', '.join(OWNERS)}")
    if held_out not in HELD_OUT:
        raise FrontierError(f"unknown held-out set {held_out!r}; choose one of {', '.join(HELD_OUT)}")


def pick(
    frontier: Frontier, min_protection: float, owner: str = "full_finetune", held_out: str = "general"
) -> FrontierPoint:
    """The point with the most transfer (plug-in share) whose protection against `owner`
    on `held_out` is at least `min_protection`."""
    _check(owner, held_out)
    ok = [p for p in frontier.points if p.against(owner, held_out) >= min_protection]
    if not ok:
        values = [p.against(owner, held_out) for p in frontier.points]
        raise FrontierError(
            f"--protection {min_protection:g}: no measured configuration of {frontier.model} reaches it against "
            f"{OWNER_WORDS[owner]} on {held_out.replace('_', '-')} text; the frontier reaches "
            f"{min(values):.2f}x to {max(values):.2f}x: ask for at most {max(values):.2f}"
        )
    return max(ok, key=lambda p: (p.plugin_share, p.against(owner, held_out)))


def match(frontier: Frontier, build_config: dict) -> FrontierPoint | None:
    """The frontier point a bundle's build config (its manifest's `build.config`) was built
    as, or None when the bundle's lossy options were never measured."""
    from .build import BuildConfig

    defaults = BuildConfig().to_dict()

    def norm(d: dict) -> dict:
        full = {**defaults, **{k: v for k, v in d.items() if k in defaults}}
        out = {k: full[k] for k in PROTECTION_KEYS}
        out["adapter_layers"] = list(out["adapter_layers"])
        if out["block_bits"]:
            out["block_bits"] = {str(k): int(v) for k, v in out["block_bits"].items()}
        return out

    want = norm(build_config)
    for p in frontier.points:
        if norm(p.build) == want:
            return p
    return None


def describe(frontier: Frontier, point: FrontierPoint) -> dict:
    """What `emulator inspect` shows: the protection measured for this configuration,
    against whom and on which text."""
    m = frontier.measured
    return {
        "config": point.config,
        "named_default": point.config == frontier.named,
        "plugin_share": point.plugin_share,
        "protection": point.protection,
        "seeds": point.seeds,
        "against": {o: OWNER_WORDS[o] for o in OWNERS},
        "measured_on": {
            "own_domain": m.get("own_domain", "own-domain held-out text"),
            "general": m.get("general", "general text"),
        },
        "protocol": m.get("protocol"),
        "command": m.get("command"),
    }


def summary_line(frontier: Frontier, point: FrontierPoint) -> str:
    p = point.protection
    return (
        f"measured ({point.config}, {frontier.model}): plug-in keeps {point.plugin_share:.0%} of the adapter ceiling's gain; "
        f"protection vs the plug-in, own-domain / general text: adapter-only owner {p['recipe']['own_domain']:.2f}x / "
        f"{p['recipe']['general']:.2f}x, +norms+temperature {p['recalibrated']['own_domain']:.2f}x / {p['recalibrated']['general']:.2f}x, "
        f"full fine-tune {p['full_finetune']['own_domain']:.2f}x / {p['full_finetune']['general']:.2f}x "
        f"(measured on {frontier.measured.get('general_short', 'general text')} and {frontier.measured.get('own_domain_short', 'own-domain text')})"
    )


def default_build_options(model: str = "smollm2-135m", path: str | Path | None = None) -> dict:
    """The lossy build options of the model's named default configuration (the best
    measured point at >= 1.3x against the strongest data owner), as BuildConfig fields."""
    return load_frontier(model, path).named_build_options()


def dial_options(model: str, min_protection: float, given: dict, path: str | Path | None = None) -> dict:
    """BuildConfig fields for `--protection`: the lossy options of the point `pick` chooses.

    `given` holds the other build options; a lossy option set away from its default
    conflicts with the dial (which would silently override it), so it is an error."""
    from .build import BuildConfig

    defaults = BuildConfig().to_dict()
    clash = [k for k in PROTECTION_KEYS if k != "adapter_layers" and k in given and given[k] not in (None, defaults[k])]
    if clash:
        flags = ", ".join("--" + k.replace("_", "-") for k in clash)
        raise FrontierError(f"--protection chooses the lossy options itself; drop {flags} or drop --protection")
    frontier = load_frontier(model, path)
    point = pick(frontier, min_protection)
    if list(given.get("adapter_layers", (2, 2))) != list(point.build.get("adapter_layers", defaults["adapter_layers"])):
        raise FrontierError(
            f"the frontier of {model} was measured with the default adapter (2,2); drop --adapter-layers to use --protection"
        )
    options = dict(point.build)
    if options.get("block_bits"):
        options["block_bits"] = {int(k): int(v) for k, v in options["block_bits"].items()}
    return options


def for_manifest(manifest: dict, path: str | Path | None = None) -> tuple[Frontier, FrontierPoint] | None:
    """The measured frontier point of a bundle, from its manifest's build config (None when
    its model or lossy options were never measured)."""
    cfg = (manifest.get("build") or {}).get("config") or {}
    model = cfg.get("model")
    if not model:
        return None
    try:
        frontier = load_frontier(model, path)
    except FrontierError:
        return None
    point = match(frontier, cfg)
    return (frontier, point) if point else None
