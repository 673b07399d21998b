"""Backward pruning, precision, resume, checkpoints under a full disk, the fused head loss."""

from __future__ import annotations

import errno

import pytest
import torch

from offsite.client.engine import CheckpointError, EngineTarget, TrainConfig, train_model
from offsite.client.engine import checkpoint as ckpt
from offsite.client.engine.headloss import frozen_head_nll
from offsite.client.engine.memory import SavedActivations
from offsite.client.engine.pruning import pruned_backward
from offsite.client.engine.schemes import apply_scheme, parse_scheme
from offsite.client.engine.stepper import Stepper
from offsite.emulators.data import Example
from offsite.emulators.losses import lm_nll_from_hidden
from offsite.emulators.models import load_model

ADAPTER = [0, 1, 6, 7]
TEXT = [Example("", ("for i in range(%d):\n    print(i)\n" % i) * 8, f"t:{i}") for i in range(24)]


def _target(name="tiny-llama"):
    lm = load_model(name)
    return EngineTarget(lm.model, lm.tokenizer, lm.family, ADAPTER)


def _batch(n=2, t=32):
    ids = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(1))
    return ids, ids.clone(), torch.ones_like(ids)


def test_frozen_prefix_runs_without_grad_and_saves_nothing():
    target = _target()
    model, family = target.model, target.family
    applied = apply_scheme(model, family, parse_scheme("top", ADAPTER))
    assert applied.lowest_block == 6
    grad_mode, outputs = {}, {}
    blocks = family.get_blocks(model)

    def record(i):
        def hook(_module, _args, out):
            grad_mode[i] = torch.is_grad_enabled()
            outputs[i] = out[0] if isinstance(out, tuple) else out

        return hook

    hooks = [b.register_forward_hook(record(i)) for i, b in enumerate(blocks)]
    cfg = TrainConfig(precision="fp32")
    stepper = Stepper(model, family, applied, cfg, torch.device("cpu"), torch.float32)
    with SavedActivations(exclude=model) as top_saved:
        nll, _ = stepper.loss_sum(*_batch())
    nll.backward()
    for h in hooks:
        h.remove()
    assert [grad_mode[i] for i in range(8)] == [False] * 6 + [True] * 2
    assert all(outputs[i].grad_fn is None and not outputs[i].requires_grad for i in range(6))
    assert outputs[7].requires_grad
    # the tied head/embedding stays frozen and gets no gradient
    emb = model.get_input_embeddings().weight
    assert not emb.requires_grad and emb.grad is None and model.get_output_embeddings().weight is emb
    applied.undo()
    full = apply_scheme(model, family, parse_scheme("full", ADAPTER))
    with SavedActivations(exclude=model) as full_saved:
        Stepper(model, family, full, cfg, torch.device("cpu"), torch.float32).loss_sum(*_batch())
    assert top_saved.bytes * 2 < full_saved.bytes  # backward depth is what costs memory


def test_pruned_backward_restores_grad_mode_and_hooks():
    target = _target()
    blocks = target.family.get_blocks(target.model)
    with pruned_backward(target.model, target.family, 3, checkpoint_blocks=True), torch.no_grad():
        pass
    assert torch.is_grad_enabled()
    assert not blocks[3]._forward_pre_hooks and "forward" not in blocks[5].__dict__


def test_activation_checkpointing_gives_same_gradients():
    results = []
    for ac in (False, True):
        r = train_model(
            _target(),
            TEXT,
            TrainConfig(
                scheme="top",
                steps=2,
                lr=1e-2,
                block_size=32,
                batch_size=2,
                precision="fp32",
                activation_checkpointing=ac,
            ),
            progress=False,
        )
        results.append(r.adapter_state)
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k])


def test_fused_head_loss_matches_chunked_loss_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    h = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    a, n1 = frozen_head_nll(head, h, labels, 5)
    (ga,) = torch.autograd.grad(a, h)
    b, n2 = lm_nll_from_hidden(head, h, labels, 5)
    (gb,) = torch.autograd.grad(b, h)
    assert n1 == n2 == 13
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_bf16_run_leaves_untouched_adapter_weights_bit_identical_and_loss_falls():
    target = _target()
    before = {k: v.clone() for k, v in target.model.named_parameters()}
    r = train_model(
        target,
        TEXT,
        TrainConfig(scheme="top", steps=6, lr=3e-3, block_size=32, batch_size=2, precision="bf16"),
        progress=False,
    )
    assert r.metrics["precision"] == "bfloat16"
    for k, v in r.adapter_state.items():
        assert v.dtype == torch.float32
        if k.startswith(("model.layers.0.", "model.layers.1.")):
            assert torch.equal(v, before[k]), k
    assert r.metrics["loss_last_avg"] < r.metrics["loss_first"]
    # the caller gets a model in its own dtypes back: a plain fp32 forward works
    assert {p.dtype for p in target.model.parameters()} == {torch.float32}
    target.model(input_ids=_batch()[0])
    for key in (
        "scheme",
        "examples",
        "tokens",
        "loss_first",
        "loss_last",
        "eval_ppl_before",
        "eval_ppl_after",
        "peak_rss_mb",
        "tokens_per_s",
        "trainable_params",
        "num_examples",
    ):
        assert r.metrics[key] is not None, key


def _cfg(tmp_path, **kw):
    base = dict(
        scheme="top:channels:0.5,bottom:norms",
        steps=5,
        lr=1e-2,
        block_size=32,
        batch_size=2,
        grad_accum=2,
        precision="fp32",
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=2,
    )
    return TrainConfig(**{**base, **kw})


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = train_model(
        _target(), TEXT, TrainConfig(**{**_cfg(tmp_path).__dict__, "checkpoint_dir": None}), progress=False
    )

    class Crash(Exception):
        pass

    def crash_at_3(step, _loss):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train_model(_target(), TEXT, _cfg(tmp_path), progress=False, on_step=crash_at_3)
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").name == "step-000002"
    resumed = train_model(_target(), TEXT, _cfg(tmp_path), progress=False)
    assert resumed.metrics["resumed_from_step"] == 2
    assert resumed.metrics["losses"] == straight.metrics["losses"]
    for k, v in straight.adapter_state.items():
        assert torch.equal(v, resumed.adapter_state[k]), k
    with pytest.raises(CheckpointError, match="other settings"):
        train_model(_target(), TEXT, _cfg(tmp_path, lr=5e-3), progress=False)


def test_full_disk_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    real = ckpt._save_tensors
    calls = {"n": 0}

    def flaky(tensors, path):
        if "step-000004" in str(path):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ckpt, "_save_tensors", flaky)
    with pytest.raises(CheckpointError, match="disk is full") as info:
        train_model(_target(), TEXT, _cfg(tmp_path), progress=False)
    assert "step-000002" in str(info.value)
    latest = ckpt.latest_checkpoint(tmp_path / "ckpt")
    assert latest.name == "step-000002"
    ckpt.load_checkpoint(latest)  # intact and readable
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no half-written leftovers


def test_fp16_stored_adapter_trains_in_fp32_and_untouched_weights_come_back_exact():
    """Bundles ship the adapter as fp16: frozen parts stay fp16 while training, trained parts are fp32."""
    target = _target()
    with torch.no_grad():
        for p in target.model.parameters():
            p.copy_(p.half().float())  # fp16-exact values, as a bundle's adapter
    before = {k: v.clone() for k, v in target.model.named_parameters()}
    seen = {}

    def on_step(step, loss):
        params = dict(target.model.named_parameters())
        seen["frozen"] = params["model.layers.0.self_attn.q_proj.weight"].dtype
        seen["trained"] = {p.dtype for p in params.values() if p.requires_grad}

    r = train_model(
        target,
        TEXT,
        TrainConfig(
            scheme="top:channels:0.5,bottom:norms", steps=3, lr=3e-3, block_size=32, batch_size=2, precision="bf16"
        ),
        progress=False,
        on_step=on_step,
    )
    assert seen == {"frozen": torch.float16, "trained": {torch.float32}}
    changed = {k for k, v in r.adapter_state.items() if not torch.equal(v, before[k])}
    assert changed and all(
        k.startswith(
            (
                "model.layers.6.",
                "model.layers.7.",
                "model.layers.0.input",
                "model.layers.0.post",
                "model.layers.1.input",
                "model.layers.1.post",
            )
        )
        for k in changed
    )
    assert torch.equal(
        r.adapter_state["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )
    assert r.metrics["tokens_per_cpu_s"] > 0


def test_release_tokenizer_drops_every_reference_after_tokenizing():
    dropped = []
    target = _target()
    target.drop_tokenizer = lambda: dropped.append(True)
    train_model(
        target,
        TEXT,
        TrainConfig(scheme="top", steps=1, block_size=32, batch_size=2, precision="fp32", release_tokenizer=True),
        progress=False,
    )
    assert target.tokenizer is None and dropped == [True]


def test_a_sequence_per_pass_gives_the_whole_batch_gradient():
    """sequences_per_pass splits each micro-batch into passes; the loss and gradient are the
    same sums (up to their order)."""
    target = _target()
    model, family = target.model, target.family
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    batch = [(ids, ids.clone(), torch.ones_like(ids))]

    def run(per_pass):
        applied = apply_scheme(model, family, parse_scheme("top", ADAPTER), snapshot=True)
        params = [p for _, p in applied.trainable_parameters()]
        cfg = TrainConfig(precision="fp32", sequences_per_pass=per_pass)
        stepper = Stepper(model, family, applied, cfg, torch.device("cpu"), torch.float32)
        loss, n = stepper.step(batch)
        grads = torch.cat([p.grad.flatten() for p in params])
        for p in params:
            p.grad = None
        applied.undo()
        return loss, n, grads

    model.requires_grad_(False)
    loss_all, n_all, g_all = run(None)
    loss_one, n_one, g_one = run(1)
    assert n_one == n_all == 4 * 31
    assert abs(loss_one - loss_all) < 1e-5
    torch.testing.assert_close(g_one, g_all, rtol=1e-4, atol=1e-6)
