"""The emulator configurations the quality bench charts, and how each is built in memory.

An `EmulatorConfig` names one lossy recipe for the middle blocks (precision per block and
projection, AWQ scaling, GPTQ rounding, layer selection, distillation, and the steps
added for issue 12: loss elevation, layer sharing, low-rank middles). `build_emulator`
turns it into an emulator model whose middle is QuantLinear (or plain Linear when the
config keeps fp32). The bench caches rows under `EmulatorConfig.key()`, so options added
later enter the key only when set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from bench.common import Protocol


@dataclass
class EmulatorConfig:
    """One emulator: which middle blocks it keeps, at which precision, distilled or not."""

    name: str
    bits: int | None = 4  # default bits of the kept middle blocks (None: fp32)
    block_bits: dict[int, int] = field(default_factory=dict)  # original index -> bits (0: fp32)
    awq: bool = False
    awq_alpha: float | None = 0.5
    clip_search: bool = False
    emulator_layers: int | None = None  # uniform layer-drop to this many middle blocks
    kept: list[int] | None = None  # explicit middle blocks (importance selection)
    distill_steps: int = 0
    distill_qat: bool = False
    group_size: int = 64
    embed_bits: int | None = None  # tied embedding / LM head stored at this many bits (None: int8 rows)
    embed_group: int = 64
    gptq: bool = False  # GPTQ error-compensating rounding (input second moments from 16 train blocks)
    # per projection type inside every quantized middle block: name suffix -> bits, e.g.
    # {"q_proj": 2, "k_proj": 2} stores the attention's query/key maps at 2 bits
    linear_bits: dict[str, int] = field(default_factory=dict)
    distill_match: str = "output"  # "all": every kept block matches its teacher block
    distill_lm_weight: float = 1.0  # 0: match the teacher only (no fine-tuning of the middle on the corpus)
    # issue 12: lossy steps that remove information or bend the loss, on top of the low bits
    prune_fraction: float = 0.0  # MLP channels zeroed per middle block, lowest Fisher score first (emulators.prune)
    elevate_margin: float | None = None  # loss elevation margin H in nats (emulators.elevate); None: off
    elevate_steps: int = 16
    share_unique: int | None = None  # CRaSh layer sharing: distinct middle blocks kept (emulators.share); None: off

    @property
    def extra_step(self) -> str:
        """The lossy step added on top of the low-bit middle (issue 12), for the table."""
        steps = []
        if self.prune_fraction:
            steps.append(f"prune {self.prune_fraction:.0%} MLP channels")
        if self.elevate_margin is not None:
            steps.append(f"elevate H={self.elevate_margin:g}")
        if self.share_unique is not None:
            steps.append(f"share: {self.share_unique} unique middle blocks")
        return ", ".join(steps)

    @property
    def selection(self) -> str:
        if self.kept is not None:
            return "importance"
        return "all" if self.emulator_layers is None else "uniform"

    def key(self) -> dict:
        d = asdict(self)
        d.pop("name")
        d["block_bits"] = {str(k): v for k, v in sorted(self.block_bits.items())}
        # options added after rows were cached enter the key only when set, so the
        # cached rows of older configurations keep their hash
        for k in _LATE_OPTIONS:
            if d[k] == _LATE_OPTIONS[k]:
                d.pop(k)
        return d


_LATE_OPTIONS = {
    "gptq": False,
    "linear_bits": {},
    "distill_match": "output",
    "distill_lm_weight": 1.0,
    "prune_fraction": 0.0,
    "elevate_margin": None,
    "elevate_steps": 16,
    "share_unique": None,
}


def bits_of(cfg: EmulatorConfig, block: int) -> int | None:
    b = cfg.block_bits.get(block, cfg.bits)
    return None if b in (0, None) else b


# The configurations charted by the full run: anchors from REFERENCES.md first, then the
# levers (low-bit vocabulary matrix, GPTQ rounding, AWQ strength, low bits per projection
# type and per depth, quantization-aware distillation of the low-bit middle).
FULL_CONFIGS: list[EmulatorConfig] = [
    EmulatorConfig("int4", bits=4),
    EmulatorConfig("int3", bits=3),
    EmulatorConfig("int3-awq", bits=3, awq=True),
    EmulatorConfig("int4+emb4", bits=4, embed_bits=4),
    EmulatorConfig("int4+emb3", bits=4, embed_bits=3),
    EmulatorConfig("int3-awq-gptq", bits=3, awq=True, gptq=True),
    EmulatorConfig("int4-awq", bits=4, awq=True),
    EmulatorConfig("int3-awq-a0.75", bits=3, awq=True, awq_alpha=0.75),
    EmulatorConfig("int4-awq-a1.0", bits=4, awq=True, awq_alpha=1.0),
    EmulatorConfig("int4-awq+qk2", bits=4, awq=True, linear_bits={"q_proj": 2, "k_proj": 2}),
    # where in depth low bits cost least share per protection: the early or the late half at 3 bits
    EmulatorConfig("awq-early3-late4", bits=4, awq=True, block_bits={i: 3 for i in range(2, 15)}),
    EmulatorConfig("awq-early4-late3", bits=4, awq=True, block_bits={i: 3 for i in range(15, 28)}),
    EmulatorConfig("awq-last4-2bit", bits=4, awq=True, block_bits={i: 2 for i in range(24, 28)}),
    EmulatorConfig("awq-8to27-3bit", bits=4, awq=True, block_bits={i: 3 for i in range(8, 28)}),
    EmulatorConfig("awq-6to25-3bit", bits=4, awq=True, block_bits={i: 3 for i in range(6, 26)}),
    # quantization-aware distillation of the 3-bit middle towards the teacher's block outputs
    EmulatorConfig(
        "int3-qat40", bits=3, distill_steps=40, distill_qat=True, distill_match="all", distill_lm_weight=0.0
    ),
    # issue 12: information a fully fine-tuning data owner cannot bring back (pruned channels
    # are a fixed point of gradient descent), and loss elevation (undone by retraining norms?)
    EmulatorConfig("int4-awq-prune50", bits=4, awq=True, prune_fraction=0.5),
    EmulatorConfig("int4-awq-prune10", bits=4, awq=True, prune_fraction=0.10),
    EmulatorConfig("int4-awq-prune15", bits=4, awq=True, prune_fraction=0.15),
    EmulatorConfig("int4-awq-prune25", bits=4, awq=True, prune_fraction=0.25),
    EmulatorConfig("int4-awq-prune35", bits=4, awq=True, prune_fraction=0.35),
    EmulatorConfig("int3-awq-prune25", bits=3, awq=True, prune_fraction=0.25),
    EmulatorConfig("int4-awq-elev0.2", bits=4, awq=True, elevate_margin=0.2),
    EmulatorConfig("int4-awq-elev0.3", bits=4, awq=True, elevate_margin=0.3),
    EmulatorConfig("int4-awq-elev0.4", bits=4, awq=True, elevate_margin=0.4),
    EmulatorConfig("int4-awq-elev0.5", bits=4, awq=True, elevate_margin=0.5),
    EmulatorConfig("int4-awq-elev0.6", bits=4, awq=True, elevate_margin=0.6),
    # CRaSh layer sharing: 26 middle blocks computed, 17 or 13 of them distinct (depth unchanged)
    EmulatorConfig("int4-awq-share17", bits=4, awq=True, share_unique=17),
    EmulatorConfig("int4-awq-share13", bits=4, awq=True, share_unique=13),
]
# Defined but not yet measured (too slow for the shared machine in the time available);
# run with --configs NAME.
PENDING_CONFIGS: list[EmulatorConfig] = []
QUICK_CONFIGS: list[EmulatorConfig] = [EmulatorConfig("int4+emb4", bits=4, embed_bits=4)]
NAMED = "int4-awq-prune10"


def build_emulator(loaded, cfg: EmulatorConfig, train, heldout, proto: Protocol, progress: bool = False):
    """(emulator model with QuantLinear middle, plan, build seconds)."""
    from offsite.emulators.quantize import collect_act_scales, quantize_module
    from offsite.emulators.split import build_emulator_model, plan_split

    t0 = time.perf_counter()
    n = loaded.family.num_layers(loaded.model.config)
    plan = plan_split(n, proto.adapter_layers, cfg.emulator_layers, cfg.kept)
    emu = build_emulator_model(loaded, plan)
    if cfg.distill_steps:
        from offsite.emulators.distill import distill_emulator

        # the best-checkpoint choice looks at training blocks: the benchmark's held-out
        # text must not steer the build
        val = type(train)(train.input_ids[-16:], train.labels[-16:], train.attention_mask[-16:])
        distill_emulator(
            loaded,
            emu,
            plan,
            train,
            val,
            cfg.distill_steps,
            progress=progress,
            match=cfg.distill_match,
            lm_weight=cfg.distill_lm_weight,
            quant_bits={p: bits_of(cfg, plan.layer_origin[p]) for p in plan.emulator_positions}
            if cfg.distill_qat
            else None,
        )
    if cfg.prune_fraction:
        from offsite.emulators.prune import prune_emulator

        # before AWQ statistics and rounding: both then see the pruned block
        prune_emulator(emu, loaded.family, plan, train, cfg.prune_fraction)
    shared: dict[int, int] = {}
    if cfg.share_unique is not None:
        from offsite.emulators.share import share_map

        # clusters from the unquantized blocks' representations; copies made after rounding
        shared = share_map(emu, loaded.family, plan, train, cfg.share_unique)
    if cfg.embed_bits:
        from offsite.emulators.quantize import fake_quantize

        # The embedding and LM head are one tied matrix: degrading it degrades both, so a
        # client cannot re-tie a clean head from a clean input embedding.
        emb = emu.get_input_embeddings().weight
        with torch.no_grad():
            emb.copy_(fake_quantize(emb, cfg.embed_bits, cfg.embed_group))
    stats = None
    if cfg.awq:
        prefixes = tuple(loaded.family.block_prefix(p) for p in plan.emulator_positions)
        stats = collect_act_scales(emu, train, lambda name: name.startswith(prefixes), max_blocks=16)
    hessians = None
    if cfg.gptq:
        from offsite.emulators.quantize import collect_input_hessians

        prefixes = tuple(loaded.family.block_prefix(p) for p in plan.emulator_positions)
        hessians = collect_input_hessians(emu, train, lambda name: name.startswith(prefixes), max_blocks=16)
    blocks = loaded.family.get_blocks(emu)
    for pos in plan.emulator_positions:
        b = bits_of(cfg, plan.layer_origin[pos])
        if b is None:
            continue
        common = dict(
            act_scales=stats,
            prefix=loaded.family.block_prefix(pos),
            awq_alpha=cfg.awq_alpha,
            clip_search=cfg.clip_search,
            hessians=hessians,
        )
        # layers quantized first become QuantLinears, which the block-wide pass skips
        for suffix, lb in sorted(cfg.linear_bits.items()):
            quantize_module(blocks[pos], lb, cfg.group_size, skip=lambda name, s=suffix: not name.endswith(s), **common)
        quantize_module(blocks[pos], b, cfg.group_size, **common)
    if shared:
        from offsite.emulators.share import apply_sharing

        apply_sharing(emu, loaded.family, shared)
    emu.offsite_shared_blocks = shared  # emulator_bytes counts a repeated block once
    if cfg.elevate_margin is not None:
        from offsite.emulators.elevate import ElevationConfig, elevate_into

        elevate_into(
            loaded.model,
            emu,
            loaded.family,
            plan,
            train,
            ElevationConfig(margin=cfg.elevate_margin, steps=cfg.elevate_steps, seed=proto.seed),
            progress=progress,
        )
    return emu, plan, time.perf_counter() - t0


def emulator_bytes(emu, family, plan, cfg: EmulatorConfig) -> int:
    """Bytes of the bundle's tensors as stored: packed low-bit middle, the tied vocabulary
    matrix as int8 rows (or packed at `embed_bits`), adapter blocks in fp16, norms fp32."""
    from offsite.emulators.quantize import packed_numel

    emb = emu.get_input_embeddings().weight
    adapter_prefixes = tuple(family.block_prefix(p) for p in plan.adapter_positions)
    repeated = tuple(family.block_prefix(p) for p in getattr(emu, "offsite_shared_blocks", {}))
    seen, total = set(), 0
    for name, t in list(emu.named_parameters()) + list(emu.named_buffers()):
        if id(t) in seen or not name or "rotary" in name or (repeated and name.startswith(repeated)):
            continue
        seen.add(id(t))
        if t is emb:
            rows, cols = t.shape
            if cfg.embed_bits:
                g = cols // cfg.embed_group if cols % cfg.embed_group == 0 else 1
                total += packed_numel(t.numel(), cfg.embed_bits) + rows * g * 4
            else:
                total += t.numel() + rows * 4
        elif name.startswith(adapter_prefixes) and t.is_floating_point():
            total += t.numel() * 2
        else:
            total += t.numel() * t.element_size()
    return total


def build_options(cfg: EmulatorConfig) -> dict | None:
    """The `BuildConfig` fields that build `cfg` as a signed bundle, or None when the
    configuration uses a bench-only lever (per-projection bits, GPTQ, a low-bit vocabulary
    matrix, distillation settings the builder does not expose)."""
    if cfg.linear_bits or cfg.gptq or cfg.embed_bits or cfg.distill_match != "output" or cfg.distill_lm_weight != 1.0:
        return None
    out: dict = {"quantize": f"int{cfg.bits}" if cfg.bits else "none", "awq": cfg.awq}
    if cfg.awq and cfg.awq_alpha != 0.5:
        out["awq_alpha"] = cfg.awq_alpha
    if cfg.block_bits:
        out["block_bits"] = {str(k): int(v) for k, v in sorted(cfg.block_bits.items())}
    if cfg.emulator_layers is not None:
        out["emulator_layers"] = cfg.emulator_layers
    if cfg.kept is not None:
        out["kept"] = list(cfg.kept)
    if cfg.distill_steps:
        out["distill_steps"] = cfg.distill_steps
    if cfg.prune_fraction:
        out["prune_fraction"] = cfg.prune_fraction
    if cfg.elevate_margin is not None:
        out["elevate_margin"] = cfg.elevate_margin
        out["elevate_steps"] = cfg.elevate_steps
    if cfg.share_unique is not None:
        out["share_unique"] = cfg.share_unique
    return out
