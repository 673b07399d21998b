"""The int8 vocabulary computes what its decoded matrix computes, and holds half the memory."""

import pytest
import torch

from offsite.client.engine.headloss import _FrozenHeadNLL, frozen_head_nll
from offsite.client.engine.vocab import Int8Vocab, install_int8_vocab
from offsite.emulators.models import load_model
from offsite.emulators.vocab_codec import int8_rows


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama with its tied vocabulary as a bundle ships it (int8 rows, decoded)."""
    model = load_model("tiny-llama").model
    model.eval().requires_grad_(False)
    w = model.get_input_embeddings().weight
    codes, scale = int8_rows(w)
    w.data = codes.float() * scale
    return model


def test_rows_reproduce_a_shipped_int8_matrix():
    torch.manual_seed(0)
    codes, scale = int8_rows(torch.randn(300, 48))
    shipped = codes.float() * scale
    v = Int8Vocab(shipped)
    assert torch.equal(v.codes, codes)
    torch.testing.assert_close(v.dense(torch.float32), shipped, rtol=1e-6, atol=0)
    # from a bf16 decode (what a bf16 client loads), the codes come back within one step
    v16 = Int8Vocab(shipped.to(torch.bfloat16))
    assert (v16.codes.int() - codes.int()).abs().max() <= 1


def test_install_serves_lookup_logits_and_undo(tiny):
    emb, head = tiny.get_input_embeddings(), tiny.get_output_embeddings()
    dense = emb.weight.detach().clone()
    ids = torch.randint(0, dense.shape[0], (2, 9))
    h = torch.randn(2, 9, dense.shape[1])
    undo = install_int8_vocab(tiny, torch.float32)
    assert undo is not None
    try:
        assert emb.weight.untyped_storage().nbytes() < 16  # no vocabulary-sized copy is left
        assert emb.weight.shape == dense.shape
        torch.testing.assert_close(emb(ids), dense[ids], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(head(h), h @ dense.t(), rtol=1e-5, atol=1e-5)
    finally:
        undo()
    torch.testing.assert_close(emb.weight.detach(), dense, rtol=1e-6, atol=0)
    assert "forward" not in emb.__dict__ and "forward" not in head.__dict__
    assert head.weight is emb.weight


def test_not_installed_on_a_trainable_or_untied_vocabulary(tiny):
    w = tiny.get_input_embeddings().weight
    w.requires_grad_(True)
    try:
        assert install_int8_vocab(tiny, torch.float32) is None
    finally:
        w.requires_grad_(False)


@pytest.mark.parametrize("n", [5, 70])
@pytest.mark.parametrize("slice_rows", [64, 61])
def test_sliced_loss_and_gradient_match_the_dense_head(tiny, n, slice_rows, monkeypatch):
    from offsite.client.engine import vocab as vocab_mod

    # several slices on the tiny vocabulary; 61 rows leave a shorter last slice
    assert tiny.get_output_embeddings().weight.shape[0] % 61
    monkeypatch.setattr(vocab_mod, "SLICE_ROWS", slice_rows)
    head = tiny.get_output_embeddings()
    dense = head.weight.detach().clone()
    torch.manual_seed(n)
    hidden = torch.randn(1, n + 1, dense.shape[1], requires_grad=True)
    labels = torch.randint(0, dense.shape[0], (1, n + 1))
    labels[0, 3] = -100  # an ignored position
    want, count = (
        _FrozenHeadNLL.apply(
            hidden[0, :-1][labels[0, 1:] != -100], dense, labels[0, 1:][labels[0, 1:] != -100], 16, torch.float32
        ),
        None,
    )
    want.backward()
    want_grad = hidden.grad.clone()
    hidden.grad = None
    undo = install_int8_vocab(tiny, torch.float32)
    try:
        got, count = frozen_head_nll(head, hidden, labels, 16, torch.float32)
        got.backward()
    finally:
        undo()
    assert count == int((labels[0, 1:] != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slice_rows", [64, 48])
def test_int8_logits_stay_close_to_the_exact_loss_and_gradient(tiny, slice_rows, monkeypatch):
    from offsite.client.engine import vocab as vocab_mod
    from offsite.client.engine.quant_forward import int8_available

    if not int8_available():
        pytest.skip("torch._int_mm does not run here")
    # 259 rows: a short last slice either way (3 or 19 rows), which takes the exact path
    monkeypatch.setattr(vocab_mod, "SLICE_ROWS", slice_rows)
    head = tiny.get_output_embeddings()
    torch.manual_seed(0)
    hidden = torch.randn(1, 65, head.weight.shape[1], requires_grad=True)
    labels = torch.randint(0, head.weight.shape[0], (1, 65))
    results = []
    int_mm, calls = torch._int_mm, []

    def counted(a, b, **kw):
        calls.append(tuple(b.shape))
        return int_mm(a, b, **kw)

    monkeypatch.setattr(torch, "_int_mm", counted)
    undo = install_int8_vocab(tiny, torch.bfloat16)
    try:
        for int8_logits in (False, True):
            hidden.grad = None
            loss, _ = frozen_head_nll(head, hidden, labels, 16, torch.bfloat16, int8_logits)
            loss.backward()
            results.append((loss.detach(), hidden.grad.clone()))
    finally:
        undo()
    (exact, exact_grad), (fast, fast_grad) = results
    assert not torch.equal(fast, exact)  # the int8 matmul did run
    # each full slice: the logits (hidden x rows^T) and the gradient (weights x rows), both int8
    full = head.weight.shape[0] // slice_rows
    assert sorted(calls) == sorted([(head.weight.shape[1], slice_rows), (slice_rows, head.weight.shape[1])] * full)
    # per-token int8 hidden states and softmax weights: the loss within 0.5%, the gradient's direction kept
    assert abs(float(fast - exact)) <= 5e-3 * float(exact)
    cos = torch.nn.functional.cosine_similarity(fast_grad.flatten(), exact_grad.flatten(), dim=0)
    assert cos > 0.999


@pytest.fixture(scope="module")
def int8_bundle(tiny_lowbit_bundle):
    """A tiny-llama bundle as the product ships them: an int3-AWQ middle, int8 vocabulary rows."""
    out, keys = tiny_lowbit_bundle("int3")
    return out, keys[1]


@pytest.mark.parametrize("budget", [None, "auto"])
def test_bundle_training_uses_int8_rows_and_gives_the_vocabulary_back(int8_bundle, budget):
    from offsite.client.engine import TrainConfig, train_adapter
    from offsite.client.engine.quant_forward import int8_available
    from offsite.emulators.bundle import load_bundle
    from offsite.emulators.data import Example

    bundle = load_bundle(int8_bundle[0], int8_bundle[1], runtime="lean", vocab_dtype=torch.bfloat16)
    emb = bundle.model.get_input_embeddings().weight
    before = emb.detach().clone()
    examples = [Example("", f"def f{i}(x):\n    return x + {i}\n" * 12) for i in range(12)]
    cfg = TrainConfig(
        scheme="top:full",  # with a budget, the budget chooses
        memory_budget_mb=budget,
        steps=2,
        lr=1e-3,
        block_size=32,
        batch_size=2,
        precision="bf16",
        probe_steps=1,
    )
    r = train_adapter(bundle, examples, cfg, progress=False, log=lambda _m: None)
    m = r.metrics
    assert m["int8_vocab"] is True
    assert all(torch.isfinite(torch.tensor(m["losses"])))
    assert m["lowbit_layers"] > 0
    if budget is None and int8_available():  # no budget: the whole int8 cache, the fast allocator
        assert m["lowbit_int8_layers"] == m["lowbit_layers"] and m["fast_mode"] is True
    if budget is not None:
        assert 0 <= m["lowbit_int8_layers"] <= m["lowbit_layers"] and "budget" in m
    assert bundle.model.get_input_embeddings().weight is emb  # the same parameter, values back
    assert emb.untyped_storage().nbytes() == before.numel() * before.element_size()
    torch.testing.assert_close(emb.detach(), before, rtol=2**-7, atol=0)


def test_held_out_perplexity_from_int8_rows_matches_the_dense_head(tiny):
    from offsite.client.engine import TrainConfig
    from offsite.client.engine.trainer import eval_ppl
    from offsite.emulators.data import TokenBlocks

    torch.manual_seed(1)
    ids = torch.randint(0, tiny.get_input_embeddings().weight.shape[0], (5, 24))
    labels = ids.clone()
    labels[:, :4] = -100
    blocks = TokenBlocks(ids, labels, torch.ones_like(ids))
    cfg = TrainConfig(batch_size=2, eval_batches=2)
    want = eval_ppl(tiny, blocks, cfg, torch.device("cpu"), torch.float32)
    undo = install_int8_vocab(tiny, torch.float32)
    try:
        got = eval_ppl(tiny, blocks, cfg, torch.device("cpu"), torch.float32)
    finally:
        undo()
    assert got == pytest.approx(want, rel=1e-5)


def test_int8_gradient_weights_carry_no_bias_over_tokens():
    """Softmax weights rounded to nearest int8 lose every tail weight under half a step, for every
    token alike, and the token-summed gradient misses that tail (6% here); the dither keeps it."""
    from offsite.client.engine.headloss import _Int8HeadNLL
    from offsite.client.engine.quant_forward import int8_available
    from offsite.client.engine.vocab import Int8Vocab

    if not int8_available():
        pytest.skip("torch._int_mm does not run here")
    torch.manual_seed(0)
    vocab_size, d, n = 16384, 64, 128
    # rows that share a mean direction, as embeddings do; a long tail of small softmax weights
    vocab = Int8Vocab(torch.randn(d) * 0.5 + torch.randn(vocab_size, d) * 0.5)
    targets = torch.randint(0, vocab_size, (n,))
    # hidden states per-token int8 holds exactly (the int8 logits are the exact ones): only the
    # gradient's int8 weights differ
    ints = (torch.randn(n, d) * 40).round().clamp(-127, 127)
    ints[:, 0] = 127
    hidden = (ints * 0.03).requires_grad_(True)
    grads = []
    for int8 in (False, True):
        hidden.grad = None
        _Int8HeadNLL.apply(hidden, vocab, targets, torch.bfloat16, int8).backward()
        grads.append(hidden.grad.clone())
    exact, fast = grads
    summed_err = (fast.sum(0) - exact.sum(0)).norm() / exact.sum(0).norm()
    assert summed_err < 0.02, summed_err  # rounded to nearest: 0.062
    assert (fast - exact).norm() / exact.norm() < 0.03
