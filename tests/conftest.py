"""Shared test set-up: tiny models only, quiet libraries, no network."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models run fastest on one thread (no OpenMP hand-offs on small matrices).
torch.set_num_threads(1)


@pytest.fixture
def offsite_cache(tmp_path, monkeypatch):
    """A private model cache directory for tests that convert or cache models."""
    path = tmp_path / "cache"
    monkeypatch.setenv("OFFSITE_CACHE", str(path))
    return path
