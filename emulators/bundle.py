"""The emulator bundle: what the model owner ships to data owners.

A bundle is a flat directory (or a tar of one):

    manifest.json         format, base model id + digest, architecture, the split (which
                          original block every emulator block came from, and its role),
                          quantization per block, sha256 + size of every other file
    manifest.sig          Ed25519 signature over the exact bytes of manifest.json (base64)
    emulator.safetensors  the frozen part: embeddings, final norm, LM head, middle blocks
                          (QuantLinear buffers where quantized); emulator parameter names
    adapter.safetensors   the initial adapter (first/last blocks), keyed by ORIGINAL names
    config.json           the emulator model's config
    tokenizer files       whatever the tokenizer's save_pretrained writes

Verification fails closed: a missing, extra, truncated or changed file, a missing or bad
signature, or the wrong key each raise `BundleError` naming the file. Loading hashes the
very bytes it deserialises, so a file swapped after verification is caught too. Weights
are safetensors only; nothing here unpickles.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import shutil
import struct
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .adapter import ADAPTER_FORMAT
from .families import Family, family_for, get_family
from .signing import (
    SigningKeyError,
    load_private_key,
    load_public_key,
    public_key_fingerprint,
    sign,
    verify_signature,
)
from .bundle_format import (  # noqa: F401  (re-exported: the bundle's public names live here too)
    ADAPTER_WEIGHTS,
    BUNDLE_FORMAT,
    CONFIG,
    EMULATOR_WEIGHTS,
    MANIFEST,
    SCALE_SUFFIX,
    SIGNATURE,
    BundleError,
    bundle_summary,
    check_listing as _check_listing,
    extract_bundle,
    read_bundle_files,
    read_manifest_unverified,
    sha256_bytes,
    verify_bundle,
)
from .split import SplitPlan, empty_model_like, to_emulator_name, to_original_name
from offsite.files import fsync_dir, sha256_file

if TYPE_CHECKING:  # see lean.py: the client's load path must not import transformers' model classes
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (codes int8 [rows, cols], scale fp32 [rows, 1])."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
    codes = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


EMBEDDING_STORAGE = ("fp32", "int8", "int4", "int3", "int2")


def _vocab_matrices(model: PreTrainedModel, family: Family) -> list[str]:
    """The big vocabulary matrices: the token embedding and an untied LM head."""
    names = []
    params = dict(model.named_parameters())  # tied duplicates removed: a tied head is skipped
    for name in (family.embeddings[0] + ".weight", family.lm_head + ".weight"):
        if name in params and params[name].dim() == 2:
            names.append(name)
    return names


@torch.no_grad()
def encode_vocab_matrices(
    model: PreTrainedModel, family: Family, storage: str, group_size: int = 64
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Encode the vocabulary matrices for storage and replace the model's copies with the
    decoded values, in place, so the model in memory is exactly what the bundle loads.

    "int8": symmetric int8 rows (near lossless); "int4"/"int3"/"int2": asymmetric groups
    along the hidden size, packed like QuantLinear weights (a deliberately lossy head: the
    plug-in uses the full model's own). Returns (manifest specs, tensors to store)."""
    if storage not in EMBEDDING_STORAGE:
        raise BundleError(f"embeddings storage must be one of {', '.join(EMBEDDING_STORAGE)}, got {storage!r}")
    specs: dict[str, dict] = {}
    stored: dict[str, torch.Tensor] = {}
    if storage == "fp32":
        return specs, stored
    params = dict(model.named_parameters())
    for name in _vocab_matrices(model, family):
        p = params[name]
        if storage == "int8":
            codes, scale = int8_rows(p)
            p.copy_(codes.float() * scale)
            stored[name], stored[name + SCALE_SUFFIX] = codes, scale
            specs[name] = {"codec": "int8-row"}
        else:
            try:
                from .quantize import pack_matrix, unpack_matrix
            except ImportError as e:
                raise BundleError(f"{storage} embeddings need offsite.emulators.quantize.pack_matrix ({e}); use int8") from None
            bits = int(storage[3:])
            packed = pack_matrix(p, bits, group_size)
            p.copy_(unpack_matrix(packed, bits, tuple(p.shape), p.dtype))
            for part, t in packed.items():
                stored[f"{name}@{part}"] = t.contiguous()
            specs[name] = {"codec": "packed", "bits": bits, "group_size": group_size, "shape": list(p.shape)}
    return specs, stored


def _decode_int8_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rows: int = 4096) -> torch.Tensor:
    """codes * scale, computed in fp32 a slice of rows at a time and stored in `dtype`, so a
    bf16 client never holds the whole matrix in fp32 (113 MB for SmolLM2's vocabulary)."""
    out = torch.empty(codes.shape, dtype=dtype)
    for i in range(0, codes.shape[0], rows):
        out[i : i + rows] = codes[i : i + rows].float() * scale[i : i + rows]
    return out


def _decode_vocab_matrices(frozen: dict[str, torch.Tensor], specs: dict[str, dict], dtype: torch.dtype = torch.float32) -> None:
    for name, spec in specs.items():
        if spec.get("codec") == "int8-row":
            codes, scale = frozen.pop(name, None), frozen.pop(name + SCALE_SUFFIX, None)
            if codes is None or scale is None or codes.dtype != torch.int8:
                raise BundleError(f"{EMULATOR_WEIGHTS}: {name} should be stored as int8 rows with a scale")
            frozen[name] = _decode_int8_rows(codes, scale, dtype)
        elif spec.get("codec") == "packed":
            from .quantize import unpack_matrix

            parts = {k: frozen.pop(f"{name}@{k}", None) for k in ("qweight", "scales", "zeros")}
            if any(v is None for v in parts.values()):
                raise BundleError(f"{EMULATOR_WEIGHTS}: {name} should be stored packed (qweight, scales, zeros)")
            try:
                frozen[name] = unpack_matrix(parts, int(spec["bits"]), tuple(spec["shape"]), torch.float32).to(dtype)
            except ValueError as e:
                raise BundleError(f"{EMULATOR_WEIGHTS}: {name}: {e}") from None
        else:
            raise BundleError(f"{MANIFEST}: unknown storage codec {spec.get('codec')!r} for {name}")


ADAPTER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@torch.no_grad()
def round_adapter(model: PreTrainedModel, plan: SplitPlan, family: Family, adapter_dtype: str) -> None:
    """Round the adapter blocks to their storage dtype in place (a no-op for fp32).

    The adapter is trained in fp32 on the client; shipping its initial weights in fp16
    halves its share of the bundle at a relative error of ~1e-4."""
    if adapter_dtype == "fp32":
        return
    params = dict(model.named_parameters())
    for name in _adapter_param_names(model, plan, family):
        p = params[name]
        p.copy_(p.to(ADAPTER_DTYPES[adapter_dtype]).to(p.dtype))


# --- writing -----------------------------------------------------------------------


def _adapter_param_names(model: PreTrainedModel, plan: SplitPlan, family: Family) -> list[str]:
    """Emulator names of every parameter inside an adapter block."""
    positions = set(plan.adapter_positions)
    return [n for n, _ in model.named_parameters() if family.block_index(n) in positions]


def _quant_label(q: dict | None) -> str:
    return "none" if not q else f"int{q['bits']}" + ("+awq" if q.get("awq") else "")


def write_bundle(
    out_dir: str | Path,
    emulator: PreTrainedModel,
    plan: SplitPlan,
    *,
    tokenizer: PreTrainedTokenizerBase,
    base_model_id: str,
    base_digest: str,
    signing_key: str | Path,
    block_quant: dict[int, dict] | None = None,
    embeddings: str = "fp32",
    embedding_group_size: int = 64,
    adapter_dtype: str = "fp32",
    base_model_bytes: int | None = None,
    build_info: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write and sign a bundle at `out_dir` atomically (staging dir, fsync, rename).

    `block_quant` maps emulator block positions to {"bits", "group_size", "awq"} for blocks
    whose linears are already QuantLinear. With `embeddings` other than "fp32" the vocabulary
    matrices are stored encoded (see `encode_vocab_matrices`), and with `adapter_dtype="fp16"` the initial adapter is stored
    in fp16; in both cases the emulator's own copies are replaced by the stored values (in
    place), so the model in memory equals the loaded one. Returns the manifest."""
    out_dir = Path(out_dir)
    if embeddings not in EMBEDDING_STORAGE:
        raise BundleError(f"embeddings storage must be one of {', '.join(EMBEDDING_STORAGE)}, got {embeddings!r}")
    if adapter_dtype not in ADAPTER_DTYPES:
        raise BundleError(f"adapter storage must be one of {', '.join(ADAPTER_DTYPES)}, got {adapter_dtype!r}")
    key = load_private_key(signing_key)  # fail before any work when the key is wrong
    family = family_for(emulator)
    block_quant = {int(k): v for k, v in (block_quant or {}).items()}
    if set(block_quant) & set(plan.adapter_positions):
        raise BundleError(f"adapter blocks {sorted(set(block_quant) & set(plan.adapter_positions))} must stay fp32: they are trained by clients")
    if family.num_layers(emulator.config) != len(plan.layer_origin):
        raise BundleError(f"the emulator has {family.num_layers(emulator.config)} blocks but the plan {len(plan.layer_origin)}")
    staging = make_staging_dir(out_dir, overwrite=overwrite)
    try:
        vocab_specs, vocab_stored = encode_vocab_matrices(emulator, family, embeddings, embedding_group_size)
        round_adapter(emulator, plan, family, adapter_dtype)

        # adapter.safetensors: the adapter blocks under their original names.
        adapter_names = _adapter_param_names(emulator, plan, family)
        params = dict(emulator.named_parameters())
        store = ADAPTER_DTYPES[adapter_dtype]
        adapter_state = {to_original_name(n, plan, family): params[n].detach().cpu().to(store).contiguous() for n in adapter_names}
        adapter_meta = {"format": ADAPTER_FORMAT, "base_model_digest": base_digest, "kind": "initial",
                        "base_model_id": base_model_id, "stored_dtype": adapter_dtype}
        _write_file(staging / ADAPTER_WEIGHTS, st_save(adapter_state, metadata=adapter_meta))

        # emulator.safetensors: everything else, tied duplicates stored once.
        frozen: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        adapter_set = set(adapter_names)
        for name, tensor in emulator.state_dict().items():
            if name in adapter_set:
                continue  # travels in adapter.safetensors (block buffers, if any, stay here)
            ptr = tensor.data_ptr()
            if tensor.numel() and ptr in seen:
                continue  # a tied weight (e.g. lm_head = embed_tokens): the model re-ties it on load
            seen.add(ptr)
            if name not in vocab_specs:
                frozen[name] = tensor.detach().cpu().contiguous()
        frozen.update(vocab_stored)
        _write_file(staging / EMULATOR_WEIGHTS, st_save(frozen, metadata={"format": BUNDLE_FORMAT}))

        emulator.config.to_json_file(str(staging / CONFIG))
        tokenizer.save_pretrained(str(staging))

        blocks_meta = []
        state = emulator.state_dict()
        for pos, origin in enumerate(plan.layer_origin):
            prefix = family.block_prefix(pos)
            nbytes = sum(t.numel() * t.element_size() for n, t in state.items() if n.startswith(prefix))
            if plan.role(pos) == "adapter":  # as stored (fp16 halves it), not as trained
                nbytes = nbytes * torch.tensor([], dtype=store).element_size() // 4
            q = block_quant.get(pos)
            blocks_meta.append({
                "position": pos,
                "origin": origin,
                "role": plan.role(pos),
                "quantization": dict(q) if q else None,
                "bytes": nbytes,
            })
        files = {}
        for path in sorted(staging.rglob("*")):
            if path.is_dir():
                raise BundleError(f"{path.name}: a bundle is flat, but the tokenizer wrote a subdirectory")
            files[path.relative_to(staging).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        labels = sorted({_quant_label(block_quant.get(p)) for p in plan.emulator_positions}) or ["none"]
        manifest = {
            "format": BUNDLE_FORMAT,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": {
                "id": base_model_id,
                "digest": base_digest,
                "family": family.name,
                "model_type": emulator.config.model_type,
                "n_layers": plan.n_layers,
                "fp32_bytes": base_model_bytes,
            },
            "config": json.loads((staging / CONFIG).read_text()),
            "plan": plan.to_dict(),
            "blocks": blocks_meta,
            "quantization": {
                "middle": labels[0] if len(labels) == 1 else "mixed",
                "embeddings": embeddings,
                "adapter": adapter_dtype,
            },
            "storage": {"encoded": vocab_specs},
            "adapter": {"file": ADAPTER_WEIGHTS, "parameters": len(adapter_state),
                        "numel": int(sum(t.numel() for t in adapter_state.values()))},
            "build": build_info or {},
            "files": files,
            "signer": {"ed25519_sha256": public_key_fingerprint(key)},
        }
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        _write_file(staging / MANIFEST, manifest_bytes)
        _write_file(staging / SIGNATURE, base64.b64encode(sign(key, manifest_bytes)) + b"\n")
        fsync_dir(staging)
        commit_staging_dir(staging, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def make_staging_dir(out_dir: Path, overwrite: bool = False) -> Path:
    """A fresh hidden directory beside `out_dir` (same filesystem, so the final rename is
    atomic); a clear error when `out_dir` exists or its parent is not writable."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"{out_dir} exists and is not a directory; choose another --out")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=parent))
    except OSError as e:
        raise BundleError(f"{parent}: cannot write there ({e.strerror}); choose a writable --out") from None


def commit_staging_dir(staging: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Move a finished staging dir to `out_dir`; an existing one is replaced only with
    `overwrite`, and then only after the new one is complete."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise BundleError(f"{out_dir} appeared while building; choose another --out or pass --overwrite")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _safetensors_metadata(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


# --- loading -----------------------------------------------------------------------


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
        return _adapter_param_names(self.model, self.plan, self.family)

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
                raise BundleError(f"adapter tensor {original!r} is not an adapter parameter of this bundle (adapter blocks: {self.plan.adapter_origin})")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise BundleError(f"adapter tensor {original!r} has shape {tuple(tensor.shape)}, the bundle expects {tuple(params[name].shape)}")
            targets[name] = tensor
        if strict and set(targets) != adapter_names:
            missing = sorted(self.to_original(n) for n in adapter_names - set(targets))
            raise BundleError(f"the adapter lacks {len(missing)} tensors of this bundle, e.g. {missing[0]!r}")
        for name, tensor in targets.items():
            params[name].copy_(tensor.to(params[name].dtype))


def _make_quant_shells(model: PreTrainedModel, family: Family, block_quant: dict[int, dict]) -> None:
    if not block_quant:
        return
    try:
        from .quantize import make_quant_shells
    except ImportError as e:
        raise BundleError(f"this bundle has quantized blocks but offsite.emulators.quantize is unavailable ({e})") from None
    blocks = family.get_blocks(model)
    for pos, q in block_quant.items():
        make_quant_shells(blocks[pos], bits=int(q["bits"]), group_size=int(q.get("group_size", 64)), awq=bool(q.get("awq", False)))


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
        raise BundleError(f"{MANIFEST}: a required field is missing ({e}); the bundle was made by an incompatible tool") from None


def _model_shell(config_dict: dict, family: Family, plan: SplitPlan, runtime: str) -> tuple[nn.Module, bool]:
    """An unfilled model for `config_dict` and whether it is the lean one."""
    from . import lean

    why_not = lean.supports(config_dict)
    if runtime == "lean" and why_not:
        raise BundleError(f"{CONFIG}: the lean runtime cannot run this model ({why_not}); load it with runtime='transformers'")
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
        raise BundleError(f"{CONFIG}: model type {model_type!r} does not belong to family {family.name!r} named in the manifest")
    if family.num_layers(config) != len(plan.layer_origin):
        raise BundleError(f"{CONFIG}: {family.num_layers(config)} blocks, the manifest's plan has {len(plan.layer_origin)}")
    return (lean.empty_model(config_dict) if use_lean else empty_model_like(config)), use_lean


def _load_bundle(path, public_key_path, device, check_signature: bool = True, runtime: str = "transformers",
                 vocab_dtype: torch.dtype = torch.float32) -> EmulatorBundle:
    manifest, manifest_bytes, blobs = read_bundle_files(path, public_key_path, check_signature)
    plan = SplitPlan.from_dict(manifest["plan"])
    family = get_family(manifest["base_model"]["family"])
    config_dict = json.loads(blobs.pop(CONFIG))
    model, use_lean = _model_shell(config_dict, family, plan, runtime)

    block_quant = {int(b["position"]): b["quantization"] for b in manifest["blocks"] if b.get("quantization")}
    _make_quant_shells(model, family, block_quant)

    frozen = st_load(blobs.pop(EMULATOR_WEIGHTS))  # the bytes go as soon as they are tensors
    encoded = manifest.get("storage", {}).get("encoded", {})
    _decode_vocab_matrices(frozen, encoded, vocab_dtype if use_lean else torch.float32)
    adapter_bytes = blobs.pop(ADAPTER_WEIGHTS)
    adapter_meta = _safetensors_metadata(adapter_bytes)
    base_digest = manifest["base_model"]["digest"]
    if adapter_meta.get("format") != ADAPTER_FORMAT:
        raise BundleError(f"{ADAPTER_WEIGHTS}: not an Offsite adapter (format {adapter_meta.get('format')!r})")
    if adapter_meta.get("base_model_digest") != base_digest:
        raise BundleError(f"{ADAPTER_WEIGHTS}: made for base model {adapter_meta.get('base_model_digest')!r}, the manifest names {base_digest!r}")
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
        _check_like(name, tensor, target, target.dtype == tensor.dtype or (name in decoded and tensor.is_floating_point()))
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
