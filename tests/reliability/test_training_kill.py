"""`kill -9` of a data owner's `offsite-client train` after its first checkpoint: the same
command run again resumes from the checkpoint and writes the same adapter, bit for bit, as
a run that was never interrupted (seeded, fp32, one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from offsite.emulators.adapter import load_adapter
from offsite.server.testing import tiny_bundle

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train(bundle, data, out, ckpt=None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "offsite.client.cli",
        "train",
        "--bundle",
        str(bundle.tar_path),
        "--public-key",
        str(bundle.public_key),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "12",
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--precision",
        "fp32",
        "--seed",
        "7",
        "--scheme",
        "top",
        "--no-progress",
    ]
    return cmd + (["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"] if ckpt else [])


def test_a_killed_training_resumes_to_the_same_adapter_bit_for_bit(tmp_path):
    bundle = tiny_bundle()
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}: what is {i}+{i}?", "completion": f" {2 * i}"}) + "\n" for i in range(16))
    )
    straight = tmp_path / "straight.safetensors"
    r = subprocess.run(_train(bundle, data, straight), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.safetensors"
    proc = subprocess.Popen(_train(bundle, data, out, ckpt), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 600
    # The first checkpoint is complete once LATEST names it (its step directory appears just before).
    while not (ckpt / "LATEST").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not out.exists(), "training finished before the kill; the test needs more steps"
    metrics = tmp_path / "resumed.json"
    r = subprocess.run(
        _train(bundle, data, out, ckpt) + ["--metrics-out", str(metrics)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(metrics.read_text())["resumed_from_step"] >= 2  # it resumed, not started over
    a, _ = load_adapter(straight)
    b, _ = load_adapter(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
