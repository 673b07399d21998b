"""Loading a verified bundle into a model a client trains: with transformers, or with the
lean runtime (`lean.py`, plain Llama, ~140 MB less resident memory).

Every byte deserialised is a byte that was hashed against the signed manifest
(`bundle_format.read_bundle_files`); weights are safetensors only, nothing unpickles; the
state must fit the model exactly (no unexpected, missing or reshaped tensors). Only the
stored low-bit format (`lowbit`) is imported here, never the model owner's calibration.
"""

from __future__ import annotations

import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from torch import nn

from .adapter import ADAPTER_FORMAT
from .bundle_format import (
    ADAPTER_WEIGHTS,
    CONFIG,
    EMULATOR_WEIGHTS,
    MANIFEST,
    BundleError,
    adapter_param_names,
    read_bundle_files,
    sha256_bytes,
)
from .families import Family, family_for, get_family
from .lowbit import make_quant_shells
from .split import SplitPlan, empty_model_like, to_emulator_name, to_original_name
from .vocab_codec import decode_vocab_matrices

if TYPE_CHECKING:  # see lean.py: the client's load path must not import transformers' model classes
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _safetensors_metadata(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


@dataclass
class EmulatorBundle:
    """A verified, loaded bundle: the emulator + adapter model and how to map names."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    manifest: dict
    family: Family
    plan: SplitPlan
    adapter_positions: list[int]
    base_digest: str
    manifest_sha256: str = ""  # names this exact bundle (e.g. in adapter metadata)
    path: str = ""
    block_quant: dict[int, dict] = field(default_factory=dict)

    @property
    def base_model_id(self) -> str:
        return self.manifest["base_model"]["id"]

    def to_original(self, name: str) -> str:
        return to_original_name(name, self.plan, self.family)

    def to_emulator(self, name: str) -> str:
        return to_emulator_name(name, self.plan, self.family)

    def adapter_modules(self) -> list[nn.Module]:
        blocks = self.family.get_blocks(self.model)
        return [blocks[p] for p in self.adapter_positions]

    def adapter_parameter_names(self) -> list[str]:
        """Emulator names of all adapter parameters."""
        return adapter_param_names(self.model, self.plan, self.family)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Current adapter weights, keyed by original names, fp32 copies on the CPU."""
        params = dict(self.model.named_parameters())
        return {self.to_original(n): params[n].detach().float().cpu().clone() for n in self.adapter_parameter_names()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Put an adapter (keyed by original names) into the emulator's adapter blocks."""
        params = dict(self.model.named_parameters())
        adapter_names = set(self.adapter_parameter_names())
        targets = {}
        for original, tensor in state.items():
            try:
                name = self.to_emulator(original)
            except KeyError:
                name = None
            if name not in adapter_names:
                raise BundleError(
                    f"adapter tensor {original!r} is not an adapter parameter of this bundle (adapter blocks: {self.plan.adapter_origin})"
                )
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise BundleError(
                    f"adapter tensor {original!r} has shape {tuple(tensor.shape)}, the bundle expects {tuple(params[name].shape)}"
                )
            targets[name] = tensor
        if strict and set(targets) != adapter_names:
            missing = sorted(self.to_original(n) for n in adapter_names - set(targets))
            raise BundleError(f"the adapter lacks {len(missing)} tensors of this bundle, e.g. {missing[0]!r}")
        for name, tensor in targets.items():
            params[name].copy_(tensor.to(params[name].dtype))


def _make_quant_shells(model: PreTrainedModel, family: Family, block_quant: dict[int, dict]) -> None:
    if not block_quant:
        return
    blocks = family.get_blocks(model)
    for pos, q in block_quant.items():
        make_quant_shells(
            blocks[pos], bits=int(q["bits"]), group_size=int(q.get("group_size", 64)), awq=bool(q.get("awq", False))
        )


RUNTIMES = ("auto", "lean", "transformers")


def load_bundle(
    path: str | Path,
    public_key_path: str | Path | None,
    device: str | torch.device | None = None,
    trust_local_copy: bool = False,
    runtime: str = "transformers",
    vocab_dtype: torch.dtype = torch.float32,
) -> EmulatorBundle:
    """Verify and load a bundle. Every byte deserialised is the byte that was hashed.

    Without a public key the bundle is refused (fail closed), unless `trust_local_copy` is
    set by a caller holding the model owner's own freshly built copy: then the signature is
    not checked, but every file still must match the manifest's sizes and hashes.

    `runtime`: "transformers" builds the model with transformers; "lean" with
    `offsite.emulators.lean` (plain Llama only; never imports transformers' model classes,
    ~140 MB less resident memory); "auto" takes lean where it applies. `vocab_dtype`: the
    dtype the embedding / LM-head matrix is decoded into (bf16 for a bf16 trainer)."""
    if runtime not in RUNTIMES:
        raise BundleError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    check_signature = not (public_key_path is None and trust_local_copy)
    try:
        return _load_bundle(path, public_key_path, device, check_signature, runtime, vocab_dtype)
    except KeyError as e:
        raise BundleError(
            f"{MANIFEST}: a required field is missing ({e}); the bundle was made by an incompatible tool"
        ) from None


def _model_shell(config_dict: dict, family: Family, plan: SplitPlan, runtime: str) -> tuple[nn.Module, bool]:
    """An unfilled model for `config_dict` and whether it is the lean one."""
    from . import lean

    why_not = lean.supports(config_dict)
    if runtime == "lean" and why_not:
        raise BundleError(
            f"{CONFIG}: the lean runtime cannot run this model ({why_not}); load it with runtime='transformers'"
        )
    use_lean = runtime == "lean" or (runtime == "auto" and why_not is None)
    model_type = config_dict.get("model_type")
    if use_lean:
        config = lean.LeanConfig.from_dict(config_dict)
    else:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise BundleError(f"{CONFIG}: unknown model_type {model_type!r}")
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    if family_for(config).name != family.name:
        raise BundleError(
            f"{CONFIG}: model type {model_type!r} does not belong to family {family.name!r} named in the manifest"
        )
    if family.num_layers(config) != len(plan.layer_origin):
        raise BundleError(
            f"{CONFIG}: {family.num_layers(config)} blocks, the manifest's plan has {len(plan.layer_origin)}"
        )
    return (lean.empty_model(config_dict) if use_lean else empty_model_like(config)), use_lean


def _load_bundle(
    path,
    public_key_path,
    device,
    check_signature: bool = True,
    runtime: str = "transformers",
    vocab_dtype: torch.dtype = torch.float32,
) -> EmulatorBundle:
    manifest, manifest_bytes, blobs = read_bundle_files(path, public_key_path, check_signature)
    plan = SplitPlan.from_dict(manifest["plan"])
    family = get_family(manifest["base_model"]["family"])
    config_dict = json.loads(blobs.pop(CONFIG))
    model, use_lean = _model_shell(config_dict, family, plan, runtime)

    block_quant = {int(b["position"]): b["quantization"] for b in manifest["blocks"] if b.get("quantization")}
    _make_quant_shells(model, family, block_quant)

    frozen = st_load(blobs.pop(EMULATOR_WEIGHTS))  # the bytes go as soon as they are tensors
    encoded = manifest.get("storage", {}).get("encoded", {})
    decode_vocab_matrices(frozen, encoded, vocab_dtype if use_lean else torch.float32)
    _fill_shared_blocks(frozen, manifest, plan, family)
    adapter_bytes = blobs.pop(ADAPTER_WEIGHTS)
    adapter_meta = _safetensors_metadata(adapter_bytes)
    base_digest = manifest["base_model"]["digest"]
    if adapter_meta.get("format") != ADAPTER_FORMAT:
        raise BundleError(f"{ADAPTER_WEIGHTS}: not an Offsite adapter (format {adapter_meta.get('format')!r})")
    if adapter_meta.get("base_model_digest") != base_digest:
        raise BundleError(
            f"{ADAPTER_WEIGHTS}: made for base model {adapter_meta.get('base_model_digest')!r}, the manifest names {base_digest!r}"
        )
    state = frozen
    for original, tensor in st_load(adapter_bytes).items():
        try:
            state[to_emulator_name(original, plan, family)] = tensor.float()  # fp16-stored adapters train in fp32
        except KeyError as e:
            raise BundleError(f"{ADAPTER_WEIGHTS}: {e}") from None
    del adapter_bytes
    if use_lean:
        _assign_state_strict(model, state, set(encoded))
    else:
        _load_state_strict(model, state)
    del state, frozen
    model.eval()
    if device is not None:
        model.to(device)
    tokenizer = _load_tokenizer(blobs, use_lean)

    return EmulatorBundle(
        model=model,
        tokenizer=tokenizer,
        manifest=manifest,
        family=family,
        plan=plan,
        adapter_positions=plan.adapter_positions,
        base_digest=base_digest,
        manifest_sha256=sha256_bytes(manifest_bytes),
        path=str(path),
        block_quant=block_quant,
    )


def _fill_shared_blocks(frozen: dict[str, torch.Tensor], manifest: dict, plan: SplitPlan, family) -> None:
    """Layer sharing: a middle block whose manifest entry `repeats` another is stored once,
    under its source; give the slot the source's tensors (the same tensors: frozen)."""
    repeats = {int(b["position"]): b["repeats"] for b in manifest["blocks"] if b.get("repeats") is not None}
    middle = set(plan.emulator_positions)
    for slot, src in sorted(repeats.items()):
        if not isinstance(src, int) or slot not in middle or src not in middle or src == slot or src in repeats:
            raise BundleError(f"manifest: block {slot} repeats {src!r}, which is not another stored middle block")
        a, b = family.block_prefix(slot), family.block_prefix(src)
        if any(n.startswith(a) for n in frozen):
            raise BundleError(f"{EMULATOR_WEIGHTS}: block {slot} is a repeat of block {src} but is stored as well")
        for n in [n for n in frozen if n.startswith(b)]:
            frozen[a + n[len(b) :]] = frozen[n]


def _load_tokenizer(files: dict[str, bytes], use_lean: bool):
    """The tokenizer from the verified bytes, not from the bundle path again."""
    if use_lean:
        from .lean import LeanTokenizer

        try:
            return LeanTokenizer(files)
        except ValueError as e:
            raise BundleError(f"tokenizer files: {e}") from None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="offsite-tokenizer-") as tok_dir:
        for name, data in files.items():
            (Path(tok_dir) / name).write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _refuse_unexpected(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise BundleError(f"{EMULATOR_WEIGHTS}: tensors the model does not have, e.g. {unexpected[0]!r}")


def _check_like(name: str, tensor: torch.Tensor, target: torch.Tensor, dtype_ok: bool) -> None:
    if tuple(target.shape) != tuple(tensor.shape) or not dtype_ok:
        raise BundleError(
            f"{EMULATOR_WEIGHTS}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the model expects {target.dtype} {tuple(target.shape)}"
        )


@torch.no_grad()
def _load_state_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that accepts only missing tied duplicates and nothing unexpected."""
    expected = model.state_dict()
    _refuse_unexpected(expected, state)
    by_ptr: dict[int, list[str]] = {}
    for name, t in expected.items():
        if t.numel():
            by_ptr.setdefault(t.data_ptr(), []).append(name)
    for name, t in expected.items():
        if name in state:
            continue
        if not any(other in state for other in by_ptr.get(t.data_ptr(), []) if other != name) or not t.numel():
            raise BundleError(f"{EMULATOR_WEIGHTS}: tensor {name!r} is missing")
    for name, tensor in state.items():
        target = expected[name]
        _check_like(name, tensor, target, target.dtype == tensor.dtype)
        target.copy_(tensor)


@torch.no_grad()
def _assign_state_strict(model: nn.Module, state: dict[str, torch.Tensor], decoded: set[str]) -> None:
    """Fill a meta-device lean model by taking the loaded tensors themselves (no second copy).

    Same checks as `_load_state_strict`; the `decoded` vocabulary matrices may come in the
    caller's `vocab_dtype` instead of fp32."""
    expected = model.state_dict()
    _refuse_unexpected(expected, state)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise BundleError(f"{EMULATOR_WEIGHTS}: tensor {missing[0]!r} is missing")
    for name, tensor in state.items():
        target = expected[name]
        _check_like(
            name, tensor, target, target.dtype == tensor.dtype or (name in decoded and tensor.is_floating_point())
        )
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
