"""Training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

Layout: ``DIR/step-000010/{trainable,optimizer}.safetensors + state.json`` and
``DIR/LATEST`` (JSON naming the newest complete step directory). A new checkpoint is
written to a temporary directory, fsynced and renamed; only then is LATEST replaced
(os.replace) and the previous step directory removed. A failure at any point (a full
disk included) leaves LATEST pointing at the previous, intact checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from offsite.files import atomic_dir, atomic_write, fsync_dir, is_disk_full


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not match this run."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in state_dict["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
) -> Path:
    """Write checkpoint `step` atomically and make it the latest; returns its directory."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    try:
        with atomic_dir(final, overwrite=True) as staging:
            opt_tensors, opt_meta = _optimizer_to_flat(optimizer_state)
            _save_tensors(trainable, staging / "trainable.safetensors")
            _save_tensors(opt_tensors, staging / "optimizer.safetensors")
            _save_tensors({"torch": torch.get_rng_state()}, staging / "rng.safetensors")
            (staging / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1))
        previous = latest_checkpoint(root)
        atomic_write(root / "LATEST", json.dumps({"step": step, "dir": final.name}))
        fsync_dir(root)
    except Exception as e:  # an OSError, or safetensors' own error type carrying the OS error
        if not (isinstance(e, OSError) or is_disk_full(e)):
            raise
        hint = "the disk is full; free space" if is_disk_full(e) else "check the directory"
        raise CheckpointError(
            f"could not write checkpoint step {step} to {root} ({getattr(e, 'strerror', None) or e}); {hint} and resume: "
            f"the previous checkpoint ({latest_checkpoint(root) or 'none'}) is intact"
        ) from e
    if previous is not None and previous != final:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    root = Path(directory)
    pointer = root / "LATEST"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{pointer}: unreadable ({e}); remove {root} to start afresh") from None
    path = root / name
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {name}, which is missing; remove {root} to start afresh")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict, torch.Tensor]:
    """(trainable tensors, optimizer state_dict, state json, torch RNG state)."""
    try:
        state = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        opt = _optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
        rng = load_file(str(path / "rng.safetensors"))["torch"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({e}); remove it to start afresh") from None
    return trainable, opt, state, rng
