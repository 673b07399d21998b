"""Emulator distillation on a tiny model: it learns, resumes at the right step, keeps the best."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.utils import parametrize

from offsite.emulators.data import TokenBlocks, perplexity, python_reference_split, tokenize_examples
from offsite.emulators.distill import DistillConfig, DistillError, distill_emulator
from offsite.emulators.models import load_model
from offsite.emulators.split import build_emulator_model, plan_split


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama")
    split = python_reference_split(1)
    train = tokenize_examples(split.shards[0][:40], loaded.tokenizer, 64)
    heldout = tokenize_examples(split.heldout[:6], loaded.tokenizer, 64)
    train = TokenBlocks(train.input_ids[:64], train.labels[:64], train.attention_mask[:64])
    heldout = TokenBlocks(heldout.input_ids[:8], heldout.labels[:8], heldout.attention_mask[:8])
    return loaded, train, heldout


def _emulator(loaded, k=2):
    plan = plan_split(8, (2, 2), emulator_layers=k)
    return build_emulator_model(loaded, plan), plan


def _middle(emu, plan, family):
    pos = set(plan.emulator_positions)
    return {n: p.detach().clone() for n, p in emu.named_parameters() if family.block_index(n) in pos}


def distill(loaded, emu, plan, train, heldout, checkpoint_dir=None, progress=False, on_progress=None, **knobs):
    return distill_emulator(
        loaded,
        emu,
        plan,
        train,
        heldout,
        DistillConfig(**knobs),
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        on_progress=on_progress,
    )


def test_distillation_lowers_the_distillation_loss_and_trains_only_the_middle(tiny):
    loaded, train, heldout = tiny
    emu, plan = _emulator(loaded)
    before = {n: p.detach().clone() for n, p in emu.named_parameters()}
    report = distill(
        loaded,
        emu,
        plan,
        train,
        heldout,
        steps=40,
        lr=3e-3,
        batch_size=4,
        progress=False,
        warmup_steps=2,
        eval_every=40,
    )
    mse = [r["mse"] for r in report["losses"]]
    assert sum(mse[-5:]) / 5 < 0.7 * sum(mse[:5]) / 5
    middle = set(plan.emulator_positions)
    for n, p in emu.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (loaded.family.block_index(n) in middle), n
    assert report["best_ppl"] <= report["ppl_before"]


def test_resume_continues_at_the_checkpointed_step_and_matches_an_uninterrupted_run(tiny, tmp_path):
    loaded, train, heldout = tiny
    kwargs = dict(steps=10, lr=1e-3, batch_size=4, progress=False, warmup_steps=2, eval_every=100, checkpoint_every=4)
    ref, plan = _emulator(loaded)
    distill(loaded, ref, plan, train, heldout, checkpoint_dir=tmp_path / "ref", **kwargs)

    emu, plan = _emulator(loaded)
    ckpt = tmp_path / "ckpt"

    def interrupt(fraction, _msg):
        if fraction >= 0.7:  # step 7: after the checkpoint at step 4, before the one at 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(loaded, emu, plan, train, heldout, checkpoint_dir=ckpt, on_progress=interrupt, **kwargs)
    latest = json.loads((ckpt / "latest.json").read_text())
    assert latest["step"] == 4 and (ckpt / "step-4" / "middle.safetensors").exists()

    resumed, plan = _emulator(loaded)
    report = distill(loaded, resumed, plan, train, heldout, checkpoint_dir=ckpt, **kwargs)
    assert report["resumed_from"] == 4
    assert len(report["losses"]) == 10
    a, b = _middle(ref, plan, loaded.family), _middle(resumed, plan, loaded.family)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_the_best_heldout_checkpoint_is_kept(tiny, tmp_path):
    loaded, train, heldout = tiny
    emu, plan = _emulator(loaded)
    # A learning rate far too high: the emulator gets worse, so the best state is an early one.
    report = distill(
        loaded,
        emu,
        plan,
        train,
        heldout,
        steps=12,
        lr=0.5,
        batch_size=4,
        progress=False,
        warmup_steps=0,
        eval_every=3,
        checkpoint_dir=tmp_path / "c",
    )
    assert report["best_ppl"] < report["ppl_final"]
    assert perplexity(emu, heldout) == pytest.approx(report["best_ppl"], rel=1e-5)
    best = json.loads((tmp_path / "c" / "best" / "best.json").read_text())
    assert best["step"] == report["best_step"]


def test_quantization_aware_distillation_leaves_plain_weights(tiny):
    loaded, train, heldout = tiny
    emu, plan = _emulator(loaded, k=4)
    report = distill(
        loaded,
        emu,
        plan,
        train,
        heldout,
        steps=20,
        lr=3e-3,
        batch_size=4,
        progress=False,
        warmup_steps=2,
        eval_every=20,
        quant_bits={p: 3 for p in plan.emulator_positions},
        match="all",
    )
    assert report["qat"]
    assert not any(parametrize.is_parametrized(m) for m in emu.modules())
    mse = [r["mse"] for r in report["losses"]]
    assert sum(mse[-4:]) < sum(mse[:4])


def test_a_foreign_checkpoint_is_refused(tiny, tmp_path):
    loaded, train, heldout = tiny
    emu, plan = _emulator(loaded)
    distill(loaded, emu, plan, train, heldout, steps=2, progress=False, checkpoint_dir=tmp_path / "c", eval_every=2)
    emu3, plan3 = _emulator(loaded, k=3)
    with pytest.raises(DistillError, match="different distillation"):
        distill(loaded, emu3, plan3, train, heldout, steps=2, progress=False, checkpoint_dir=tmp_path / "c")


def test_nothing_to_train_is_a_clear_error(tiny):
    from offsite.emulators.quantize import quantize_module

    loaded, train, heldout = tiny
    emu, plan = _emulator(loaded)
    for p in plan.emulator_positions:
        quantize_module(loaded.family.get_blocks(emu)[p], 4)
    with pytest.raises(DistillError, match="distill before quantizing"):
        distill(loaded, emu, plan, train, heldout, steps=2, progress=False)
