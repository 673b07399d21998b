"""Building a signed emulator bundle: the model owner's one-time step.

load model -> corpus -> split plan -> emulator model -> distillation (optional) ->
quantization (optional, AWQ statistics from the corpus) -> write + sign.

Everything that can be checked cheaply (options, signing key, the output path, the split)
is checked before the model is touched, and the bundle is written to a staging directory
that is renamed into place only when complete: a failed build leaves nothing at `out`.
Distillation checkpoints live beside `out` (``.NAME.distill-HASH``) so re-running the
same command after an interruption resumes; they are removed after a successful build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .bundle import EMBEDDING_STORAGE, BundleError, encode_vocab_matrices, round_adapter, write_bundle
from .calibrate import collect_act_scales, quantize_module
from .data import PYTHON_REFERENCE, DataError, TokenBlocks, load_examples, python_reference_split, tokenize_examples
from .distill import DistillConfig, distill_emulator
from .models import LoadedModel, load_model
from .signing import load_private_key
from .split import SplitPlan, build_emulator_model, plan_split

QUANTIZE_CHOICES = ("none", "int8", "int4", "int3", "int2")
ProgressFn = Callable[[float, str], None]


class BuildError(ValueError):
    """A build option or input that cannot work; the message says which and how to fix it."""


@dataclass
class BuildConfig:
    model: str = "smollm2-135m"
    adapter_layers: tuple[int, int] = (2, 2)
    emulator_layers: int | None = None  # None keeps every middle block
    distill_steps: int = 0
    quantize: str = "none"  # none | int8 | int4 | int3 | int2 (middle blocks)
    awq: bool = False
    corpus: str = PYTHON_REFERENCE
    block_size: int = 256
    seed: int = 0
    kept: list[int] | None = None  # explicit original middle indices (importance selection)
    # Extensions (defaults keep the agreed behaviour):
    group_size: int = 64
    awq_alpha: float | None = 0.5  # None searches the exponent per layer
    awq_calibration_blocks: int = 16
    clip_search: bool = False
    block_bits: dict[int, int] | None = None  # mixed precision: original block index -> bits (overrides `quantize`)
    embeddings: str = "auto"  # fp32 | int8 | int4 | int3 | int2 | auto (int8 rows when the middle is quantized)
    embedding_group_size: int = 64
    adapter_dtype: str = "auto"  # fp32 | fp16 | auto (fp16 when the middle is quantized)
    distill_lr: float = 1e-4
    distill_batch_size: int = 4
    distill_mse_weight: float = 30.0
    distill_match: str = "output"  # "output" (the paper) or "all" (every kept middle block)
    distill_kl_weight: float = 0.0
    distill_quant_aware: bool = True  # fake-quantize the middle during distillation when it will be quantized
    # Lossy steps against data owners who train more than the adapter (emulators.prune / .elevate):
    prune_fraction: float = 0.0  # MLP channels zeroed per middle block, lowest gradient score first
    elevate_margin: float | None = None  # loss elevation margin H (nats/token) trained into the middle norms
    elevate_steps: int = 16
    share_unique: int | None = None  # layer sharing (emulators.share): distinct middle blocks kept, depth unchanged

    def validate(self) -> None:
        if self.share_unique is not None:
            if self.share_unique < 1:
                raise BuildError(
                    f"--share {self.share_unique} must be >= 1: the number of distinct middle blocks to keep"
                )
            if self.elevate_margin is not None:
                raise BuildError("--share and --elevate cannot be combined: elevation retrains each slot's norms apart")
            if self.block_bits:
                raise BuildError("--share needs one precision for the whole middle: drop --block-bits")
        if not 0.0 <= self.prune_fraction < 1.0:
            raise BuildError(
                f"--prune {self.prune_fraction} must be in [0, 1): the share of each middle block's MLP channels to remove"
            )
        if self.elevate_margin is not None and self.elevate_margin < 0:
            raise BuildError(
                f"--elevate {self.elevate_margin} must be >= 0 (nats per token above the full model, e.g. 0.4)"
            )
        if self.elevate_steps < 1:
            raise BuildError(f"elevate_steps {self.elevate_steps} must be >= 1")
        if self.quantize not in QUANTIZE_CHOICES:
            raise BuildError(f"--quantize {self.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
        if self.awq and self.quantize == "none" and not self.block_bits:
            raise BuildError("--awq scales weights before low-bit rounding; add --quantize int4 (or int3/int2/int8)")
        if self.distill_steps < 0:
            raise BuildError(f"--distill-steps must be 0 or more, got {self.distill_steps}")
        if self.block_size < 8:
            raise BuildError(f"block size {self.block_size} is too small; use e.g. 256")
        if self.embeddings != "auto" and self.embeddings not in EMBEDDING_STORAGE:
            raise BuildError(
                f"embeddings storage {self.embeddings!r} must be auto or one of {', '.join(EMBEDDING_STORAGE)}"
            )
        if self.adapter_dtype not in ("auto", "fp32", "fp16"):
            raise BuildError(f"adapter storage {self.adapter_dtype!r} must be auto, fp32 or fp16")
        for idx, bits in (self.block_bits or {}).items():
            if bits not in (0, 8, 4, 3, 2):
                raise BuildError(f"block {idx}: {bits} bits is not supported (8, 4, 3, 2, or 0 for fp32)")

    def storage(self, quantized: bool) -> tuple[str, str]:
        """(embeddings, adapter) storage: compressed only when the middle is quantized, so
        an unquantized bundle reproduces the base model exactly."""
        emb = self.embeddings if self.embeddings != "auto" else ("int8" if quantized else "fp32")
        ad = self.adapter_dtype if self.adapter_dtype != "auto" else ("fp16" if quantized else "fp32")
        return emb, ad

    @property
    def middle_bits(self) -> int | None:
        return None if self.quantize == "none" else int(self.quantize[3:])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapter_layers"] = list(self.adapter_layers)
        if self.block_bits is not None:
            d["block_bits"] = {str(k): v for k, v in self.block_bits.items()}
        return d


@dataclass
class Corpus:
    train: TokenBlocks
    heldout: TokenBlocks
    source: str
    notes: list[str] = field(default_factory=list)


def load_corpus(corpus: str, tokenizer, block_size: int) -> Corpus:
    """The model owner's corpus as token blocks: `python-reference` uses its topic split
    (held-out topics); a user path holds out every 10th block (at least one)."""
    if corpus == PYTHON_REFERENCE:
        split = python_reference_split(n_shards=1)
        train = tokenize_examples(split.shards[0], tokenizer, block_size)
        heldout = tokenize_examples(split.heldout, tokenizer, block_size)
        return Corpus(train, heldout, corpus)
    try:
        examples = load_examples(corpus, tokenizer)
        blocks = tokenize_examples(examples, tokenizer, block_size)
    except DataError as e:
        raise DataError(f"--corpus {corpus}: {e}") from None
    n = len(blocks)
    notes = []
    if n == 1:
        notes.append("the corpus holds one block: it serves as training and held-out data")
        return Corpus(blocks, blocks, corpus, notes)
    held = set(range(0, n, 10))
    held_idx = torch.tensor(sorted(held))
    train_idx = torch.tensor([i for i in range(n) if i not in held])

    def take(idx):
        return TokenBlocks(blocks.input_ids[idx], blocks.labels[idx], blocks.attention_mask[idx])

    return Corpus(take(train_idx), take(held_idx), corpus, notes)


def model_fp32_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct tensors at fp32 (tied weights once): its fp32 file size."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        if t.numel() and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * 4
    return total


def _preflight_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise BuildError(f"--out {out} already exists; choose another path or pass --overwrite")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise BuildError(f"--out {out}: cannot write in {parent} ({e.strerror}); choose a writable location") from None


def _stage_printer(progress: bool) -> ProgressFn:
    def report(fraction: float, message: str) -> None:
        if progress:
            print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    return report


def block_quant_plan(cfg: BuildConfig, plan: SplitPlan) -> dict[int, int]:
    """Emulator position -> bits for every quantized middle block."""
    out: dict[int, int] = {}
    for pos in plan.emulator_positions:
        origin = plan.layer_origin[pos]
        bits = cfg.middle_bits
        if cfg.block_bits is not None and origin in cfg.block_bits:
            bits = cfg.block_bits[origin] or None
        if bits:
            out[pos] = int(bits)
    return out


def _distill(cfg, loaded, emulator, plan, corpus, checkpoint_dir, progress, report) -> dict:
    dcfg = DistillConfig(
        steps=cfg.distill_steps,
        lr=cfg.distill_lr,
        mse_weight=cfg.distill_mse_weight,
        batch_size=cfg.distill_batch_size,
        match=cfg.distill_match,
        kl_weight=cfg.distill_kl_weight,
        group_size=cfg.group_size,
        seed=cfg.seed,
        # train the latent weights through the rounding they will be stored at
        quant_bits=(block_quant_plan(cfg, plan) or None) if cfg.distill_quant_aware else None,
    )
    report_ = dict(
        distill_emulator(
            loaded,
            emulator,
            plan,
            corpus.train,
            corpus.heldout,
            dcfg,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            on_progress=lambda f, msg="distilling": report(0.15 + 0.6 * float(f), msg),
        )
        or {}
    )
    losses = report_.pop("losses", None)
    if losses:
        # The manifest keeps the curve's shape, not every step of a long run.
        stride = max(1, len(losses) // 50)

        def rounded(v):
            return {k: round(float(x), 4) for k, x in v.items()} if isinstance(v, dict) else round(float(v), 4)

        report_["loss_curve"] = {"every": stride, "values": [rounded(v) for v in losses[::stride]]}
    return report_


def _quantize(cfg, emulator, plan, family, corpus, report) -> dict[int, dict]:
    bits_by_pos = block_quant_plan(cfg, plan)
    if not bits_by_pos:
        return {}
    act_scales = None
    if cfg.awq:
        report(
            0.76,
            f"collecting activation statistics on {min(cfg.awq_calibration_blocks, len(corpus.train))} corpus blocks (AWQ)",
        )
        prefixes = tuple(family.block_prefix(p) for p in bits_by_pos)
        act_scales = collect_act_scales(
            emulator,
            corpus.train,
            module_filter=lambda name: (name + ".").startswith(prefixes),
            max_blocks=cfg.awq_calibration_blocks,
        )
    blocks = family.get_blocks(emulator)
    block_quant = {}
    for i, (pos, bits) in enumerate(sorted(bits_by_pos.items())):
        report(
            0.8 + 0.1 * i / len(bits_by_pos), f"quantizing block {pos} (original {plan.layer_origin[pos]}) to int{bits}"
        )
        quantize_module(
            blocks[pos],
            bits,
            cfg.group_size,
            act_scales,
            prefix=family.block_prefix(pos),
            awq_alpha=cfg.awq_alpha,
            clip_search=cfg.clip_search,
        )
        block_quant[pos] = {
            "bits": bits,
            "group_size": cfg.group_size,
            "awq": bool(cfg.awq),
            "awq_alpha": cfg.awq_alpha if cfg.awq else None,
            "clip_search": cfg.clip_search,
        }
    return block_quant


def checkpoint_dir_for(cfg: BuildConfig, base_digest: str, out: Path) -> Path:
    """Where an interrupted build's distillation resumes from: keyed by everything that
    changes the distilled weights."""
    key = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in ("awq", "awq_alpha", "clip_search", "embeddings", "adapter_dtype", "awq_calibration_blocks")
    }
    key["base"] = base_digest
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return out.parent / f".{out.name}.distill-{h}"


def prepare_emulator(
    cfg: BuildConfig,
    loaded: LoadedModel,
    corpus: Corpus | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
    apply_storage: bool = True,
) -> tuple[torch.nn.Module, SplitPlan, dict[int, dict], dict]:
    """The emulator in memory, without writing: (emulator, plan, block_quant, info).

    For benchmarks and the demo; `build_bundle` is this plus write + sign. With
    `apply_storage`, the embeddings and adapter are rounded as the bundle would store them,
    so the model in memory is the one clients would load."""
    cfg.validate()
    report = on_progress or _stage_printer(progress)
    family = loaded.family
    plan = plan_split(family.num_layers(loaded.model.config), tuple(cfg.adapter_layers), cfg.emulator_layers, cfg.kept)
    if corpus is None and (
        cfg.distill_steps or cfg.awq or cfg.prune_fraction or cfg.elevate_margin is not None or cfg.share_unique
    ):
        corpus = load_corpus(cfg.corpus, loaded.tokenizer, cfg.block_size)
    report(0.12, f"building the emulator: blocks {plan.layer_origin} of {plan.n_layers}")
    torch.manual_seed(cfg.seed)
    emulator = build_emulator_model(loaded, plan)
    info: dict = {}
    if cfg.distill_steps:
        report(0.15, f"distilling the emulator for {cfg.distill_steps} steps")
        t = time.time()
        info["distill"] = _distill(
            cfg, loaded, emulator, plan, corpus, checkpoint_dir, progress and on_progress is None, report
        )
        info["distill_seconds"] = round(time.time() - t, 2)
    if cfg.prune_fraction:
        from .prune import prune_emulator

        # before AWQ statistics and rounding, so both see the pruned blocks
        report(0.74, f"pruning {cfg.prune_fraction:.0%} of each middle block's MLP channels (gradient-scored)")
        pruned = prune_emulator(emulator, family, plan, corpus.train, cfg.prune_fraction)
        info["pruned_channels"] = {str(plan.layer_origin[p]): len(v) for p, v in pruned.items()}
    shared: dict[int, int] = {}
    if cfg.share_unique is not None:
        from .share import share_map

        # clusters from the unrounded blocks' representations; the copies are made after rounding
        report(0.75, f"clustering the middle into {cfg.share_unique} shared blocks (representation similarity)")
        shared = share_map(emulator, family, plan, corpus.train, cfg.share_unique)
    block_quant = _quantize(cfg, emulator, plan, family, corpus, report)
    if shared:
        from .share import apply_sharing

        apply_sharing(emulator, family, shared)
        info["shared_blocks"] = {str(slot): src for slot, src in sorted(shared.items())}
    emulator.offsite_shared_blocks = shared  # write_bundle stores each repeated block once
    if cfg.elevate_margin is not None:
        from .elevate import ElevationConfig, elevate_into

        report(0.9, f"elevating the emulator's loss {cfg.elevate_margin} nats above the full model's")
        rep = elevate_into(
            loaded.model,
            emulator,
            family,
            plan,
            corpus.train,
            ElevationConfig(margin=cfg.elevate_margin, steps=cfg.elevate_steps, seed=cfg.seed),
        )
        info["elevation"] = {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in rep.items() if k != "loss_curve"
        }
    # Round what the bundle stores compressed now, so this in-memory emulator is the one
    # clients will load (benchmarks measure the real thing).
    embeddings, adapter_dtype = cfg.storage(bool(block_quant))
    if apply_storage:
        encode_vocab_matrices(emulator, family, embeddings, cfg.embedding_group_size)
        round_adapter(emulator, plan, family, adapter_dtype)
    info["storage"] = {"embeddings": embeddings, "adapter": adapter_dtype}
    return emulator, plan, block_quant, info


def build_bundle(
    cfg: BuildConfig,
    signing_key_path: str | Path,
    out: str | Path,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
    overwrite: bool = False,
    loaded: LoadedModel | None = None,
) -> dict:
    """Build, sign and write a bundle to `out`; returns its manifest."""
    started = time.time()
    out = Path(out)
    report = on_progress or _stage_printer(progress)
    cfg.validate()
    load_private_key(signing_key_path)  # a wrong or missing key fails before any work
    _preflight_out(out, overwrite)

    report(0.0, f"loading model {cfg.model}")
    if loaded is None:
        loaded = load_model(cfg.model)
    family = loaded.family
    # The split is checked before the (slower) corpus, so a bad layer count fails at once.
    plan_split(family.num_layers(loaded.model.config), tuple(cfg.adapter_layers), cfg.emulator_layers, cfg.kept)
    report(0.05, f"reading corpus {cfg.corpus}")
    corpus = load_corpus(cfg.corpus, loaded.tokenizer, cfg.block_size)

    ckpt = checkpoint_dir_for(cfg, loaded.digest, out) if cfg.distill_steps else None
    # write_bundle encodes the embeddings itself (once, so memory and file agree exactly).
    emulator, plan, block_quant, info = prepare_emulator(
        cfg, loaded, corpus, ckpt, progress, report, apply_storage=False
    )

    report(0.9, f"writing and signing the bundle at {out}")
    embeddings, adapter_dtype = cfg.storage(bool(block_quant))
    build_info = {
        "config": cfg.to_dict(),
        "corpus": {
            "source": corpus.source,
            "train_blocks": len(corpus.train),
            "heldout_blocks": len(corpus.heldout),
            "notes": corpus.notes,
        },
        "build_seconds": None,
        "torch": torch.__version__,
        **info,
    }
    build_info["build_seconds"] = round(time.time() - started, 2)
    try:
        manifest = write_bundle(
            out,
            emulator,
            plan,
            tokenizer=loaded.tokenizer,
            base_model_id=loaded.model_id,
            base_digest=loaded.digest,
            signing_key=signing_key_path,
            block_quant=block_quant,
            shared_blocks={int(k): v for k, v in info.get("shared_blocks", {}).items()},
            embeddings=embeddings,
            embedding_group_size=cfg.embedding_group_size,
            adapter_dtype=adapter_dtype,
            base_model_bytes=model_fp32_bytes(loaded.model),
            build_info=build_info,
            overwrite=overwrite,
        )
    except BundleError as e:
        raise BuildError(str(e)) from None
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
    report(1.0, f"bundle written: {out}")
    return manifest
