"""bench.offsite_quality's baselines: trained on copies, cached, resumed from the cache."""

import torch

from bench.common import Protocol, corpus_blocks
from bench.offsite_quality_measure import measure_baselines
from offsite.emulators.data import TokenBlocks
from offsite.emulators.models import load_model


def _rows(b: TokenBlocks, a: int, z: int) -> TokenBlocks:
    return TokenBlocks(b.input_ids[a:z], b.labels[a:z], b.attention_mask[a:z])


def test_baselines_train_copies_and_resume_from_the_cache(tmp_path, one_thread):
    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    train, held = corpus_blocks(loaded, 32)
    sets = {"own_domain": _rows(held, 0, 4), "general": _rows(held, 4, 8)}
    proto = Protocol(block_size=32, batch_size=2, steps=2, lr=1e-3, full_lr=1e-3)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}

    out = measure_baselines(loaded, _rows(train, 0, 8), sets, proto, tmp_path, {"k": 1}, progress=False)
    ppl = {k: v["ppl"] for k, v in out.items()}
    # the ceiling trains the adapter blocks, full fine-tuning every block: two different copies,
    # and both move the model away from its zero-shot perplexity
    assert len(set(ppl.values())) == 3
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert sorted(p.name.split("-v2")[0] for p in tmp_path.iterdir()) == ["ceiling", "full-ft", "zero-shot"]

    again = measure_baselines(loaded, None, sets, proto, tmp_path, {"k": 1}, progress=False)
    assert {k: v["ppl"] for k, v in again.items()} == ppl  # read back, nothing trained (train=None)
