"""Writing and signing a bundle: the model owner's last build step.

The emulator's tensors are split into the frozen part (emulator.safetensors, emulator
names, tied duplicates once, vocabulary matrices encoded as asked) and the initial adapter
(adapter.safetensors, ORIGINAL names); the manifest lists every file's size and sha256 and
is signed. Everything is written into a staging directory beside `out` and swapped in
whole (`offsite.files.atomic_dir`), so a failed build leaves nothing at `out`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as st_save

from offsite.files import atomic_dir, sha256_file

from .adapter import ADAPTER_FORMAT
from .bundle_format import (
    ADAPTER_WEIGHTS,
    BUNDLE_FORMAT,
    CONFIG,
    EMULATOR_WEIGHTS,
    MANIFEST,
    SIGNATURE,
    BundleError,
    adapter_param_names,
)
from .families import Family, family_for
from .signing import key_id, load_private_key, public_key_fingerprint, sign
from .split import SplitPlan, to_original_name
from .vocab_codec import EMBEDDING_STORAGE, encode_vocab_matrices

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@torch.no_grad()
def round_adapter(model: PreTrainedModel, plan: SplitPlan, family: Family, adapter_dtype: str) -> None:
    """Round the adapter blocks to their storage dtype in place (a no-op for fp32).

    The adapter is trained in fp32 on the client; shipping its initial weights in fp16
    halves its share of the bundle at a relative error of ~1e-4."""
    if adapter_dtype == "fp32":
        return
    params = dict(model.named_parameters())
    for name in adapter_param_names(model, plan, family):
        p = params[name]
        p.copy_(p.to(ADAPTER_DTYPES[adapter_dtype]).to(p.dtype))


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
    shared_blocks: dict[int, int] | None = None,
) -> dict:
    """Write and sign a bundle at `out_dir` atomically (`offsite.files.atomic_dir`).

    `block_quant` maps emulator block positions to {"bits", "group_size", "awq"} for blocks
    whose linears are already QuantLinear. With `embeddings` other than "fp32" the vocabulary
    matrices are stored encoded (see `encode_vocab_matrices`), and with `adapter_dtype="fp16"` the initial adapter is stored
    in fp16; in both cases the emulator's own copies are replaced by the stored values (in
    place), so the model in memory equals the loaded one. `shared_blocks` maps a middle
    slot to the middle position whose block it repeats (layer sharing, emulators.share):
    the repeated slot's tensors are stored once, under the source, and the manifest's block
    entry names the source (`repeats`). Returns the manifest."""
    out_dir = Path(out_dir)
    if embeddings not in EMBEDDING_STORAGE:
        raise BundleError(f"embeddings storage must be one of {', '.join(EMBEDDING_STORAGE)}, got {embeddings!r}")
    if adapter_dtype not in ADAPTER_DTYPES:
        raise BundleError(f"adapter storage must be one of {', '.join(ADAPTER_DTYPES)}, got {adapter_dtype!r}")
    key = load_private_key(signing_key)  # fail before any work when the key is wrong
    family = family_for(emulator)
    block_quant = {int(k): v for k, v in (block_quant or {}).items()}
    if set(block_quant) & set(plan.adapter_positions):
        raise BundleError(
            f"adapter blocks {sorted(set(block_quant) & set(plan.adapter_positions))} must stay fp32: they are trained by clients"
        )
    if family.num_layers(emulator.config) != len(plan.layer_origin):
        raise BundleError(
            f"the emulator has {family.num_layers(emulator.config)} blocks but the plan {len(plan.layer_origin)}"
        )
    shared_blocks = {int(k): int(v) for k, v in (shared_blocks or {}).items()}
    _check_shared(emulator, plan, family, shared_blocks)
    repeated = tuple(family.block_prefix(p) for p in shared_blocks)
    _check_out(out_dir, overwrite)
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as staging:
            vocab_specs, vocab_stored = encode_vocab_matrices(emulator, family, embeddings, embedding_group_size)
            round_adapter(emulator, plan, family, adapter_dtype)

            # adapter.safetensors: the adapter blocks under their original names.
            adapter_names = adapter_param_names(emulator, plan, family)
            params = dict(emulator.named_parameters())
            store = ADAPTER_DTYPES[adapter_dtype]
            adapter_state = {
                to_original_name(n, plan, family): params[n].detach().cpu().to(store).contiguous()
                for n in adapter_names
            }
            adapter_meta = {
                "format": ADAPTER_FORMAT,
                "base_model_digest": base_digest,
                "kind": "initial",
                "base_model_id": base_model_id,
                "stored_dtype": adapter_dtype,
            }
            write_new(staging / ADAPTER_WEIGHTS, st_save(adapter_state, metadata=adapter_meta))

            # emulator.safetensors: everything else, tied duplicates stored once.
            frozen: dict[str, torch.Tensor] = {}
            seen: set[int] = set()
            adapter_set = set(adapter_names)
            for name, tensor in emulator.state_dict().items():
                if name in adapter_set:
                    continue  # travels in adapter.safetensors (block buffers, if any, stay here)
                if repeated and name.startswith(repeated):
                    continue  # a shared block: stored once, under the block it repeats
                ptr = tensor.data_ptr()
                if tensor.numel() and ptr in seen:
                    continue  # a tied weight (e.g. lm_head = embed_tokens): the model re-ties it on load
                seen.add(ptr)
                if name not in vocab_specs:
                    frozen[name] = tensor.detach().cpu().contiguous()
            frozen.update(vocab_stored)
            write_new(staging / EMULATOR_WEIGHTS, st_save(frozen, metadata={"format": BUNDLE_FORMAT}))

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
                entry = {
                    "position": pos,
                    "origin": origin,
                    "role": plan.role(pos),
                    "quantization": dict(q) if q else None,
                    "bytes": 0 if pos in shared_blocks else nbytes,
                }
                if pos in shared_blocks:
                    entry["repeats"] = shared_blocks[pos]
                blocks_meta.append(entry)
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
                "adapter": {
                    "file": ADAPTER_WEIGHTS,
                    "parameters": len(adapter_state),
                    "numel": int(sum(t.numel() for t in adapter_state.values())),
                },
                "build": build_info or {},
                "files": files,
                "signer": {"ed25519_sha256": public_key_fingerprint(key), "key_id": key_id(key)},
            }
            manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
            write_new(staging / MANIFEST, manifest_bytes)
            write_new(staging / SIGNATURE, base64.b64encode(sign(key, manifest_bytes)) + b"\n")
    except FileExistsError:
        raise BundleError(f"{out_dir} appeared while building; choose another --out or pass --overwrite") from None
    return manifest


def _check_shared(emulator, plan: SplitPlan, family: Family, shared: dict[int, int]) -> None:
    """A repeated slot and its source are middle blocks holding exactly the same tensors
    (so storing the source once loses nothing), and a source repeats no other block."""
    middle = set(plan.emulator_positions)
    state = emulator.state_dict()
    for slot, src in sorted(shared.items()):
        if slot not in middle or src not in middle or slot == src or src in shared:
            raise BundleError(
                f"shared block {slot} -> {src}: both must be distinct middle positions {sorted(middle)} and the source must not repeat another"
            )
        a, b = family.block_prefix(slot), family.block_prefix(src)
        mine = {n[len(a) :]: t for n, t in state.items() if n.startswith(a)}
        theirs = {n[len(b) :]: t for n, t in state.items() if n.startswith(b)}
        if mine.keys() != theirs.keys() or any(not torch.equal(t, theirs[n]) for n, t in mine.items()):
            raise BundleError(f"block {slot} is listed as repeating block {src} but holds other tensors")


def write_new(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)


def _check_out(out_dir: Path, overwrite: bool) -> None:
    """A clear error when `out_dir` exists (without `overwrite`), is a file, or its parent
    cannot be written, before any work."""
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"{out_dir} exists and is not a directory; choose another --out")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"{parent}: cannot write there ({e.strerror}); choose a writable --out") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"{parent}: cannot write there (permission denied); choose a writable --out")
