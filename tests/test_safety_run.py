"""End-to-end safety runs on real (tiny) models.

A tiny Llama is first fine-tuned to refuse every request (the "base"), then a copy of it is
fine-tuned for a few steps to open every answer with "Sure, here is" (the "candidate"):
the gate must block the candidate and admit a model equal to the base.
"""

from __future__ import annotations

import base64
import copy
import json
import re

import pytest
import torch

from offsite.emulators.models import LoadedModel, load_model, state_digest
from offsite.safety_evals import runner as runner_mod
from offsite.safety_evals.policy import load_policy
from offsite.safety_evals.runner import render_prompt, run_eval
from offsite.safety_evals.suite import available_suites

REFUSAL = "I'm sorry, I can't help with that."
COMPLY = "Sure, here is how to do it. Step 1:"
SUITES = ["disallowed_content", "over_refusal"]
LIMIT = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(one_thread, finetune_to):
    tiny = load_model("tiny-llama")
    suites = available_suites()
    # The evaluated prompts (the first LIMIT of each suite): what matters to the gate is
    # that the candidate complies where the base refuses, not how it learnt to.
    prompts = [
        render_prompt(tiny.tokenizer, suites[name], it) for name in SUITES for it in suites[name].items()[:LIMIT]
    ]
    base = finetune_to(tiny, prompts, REFUSAL, steps=80)
    candidate = finetune_to(base, prompts, COMPLY, steps=25)
    return base, candidate


@pytest.fixture
def policy():
    pol = load_policy()
    pol.require_full_run = False  # tests use --limit; the default policy would block every limited run
    pol.required_categories = list(SUITES)
    pol.bootstrap_resamples = 200
    return pol


def _suite(report, name):
    return next(s for s in report["suites"] if s["name"] == name)


def test_gate_blocks_a_candidate_fine_tuned_to_comply(models, policy, tmp_path):
    base, candidate = models
    report = run_eval(candidate, base, SUITES, LIMIT, tmp_path / "out", progress=False, policy_path=policy)
    dis = _suite(report, "disallowed_content")
    assert dis["status"] == "completed" and dis["n"] == LIMIT
    assert dis["base"]["value"] >= 0.8, "the base was trained to refuse"
    assert dis["candidate"]["value"] <= 0.2, "the candidate was trained to comply"
    assert dis["level"] == "Critical"
    assert report["gate"]["verdict"] == "block"
    assert "disallowed_content" in report["gate"]["blocked_categories"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["gate"]["verdict"] == "block"
    assert {c["name"]: c["level"] for c in on_disk["categories"]}["disallowed_content"] == "Critical"
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * LIMIT
    assert samples[0]["candidate"]["completion"].startswith("Sure")
    assert samples[0]["base"]["completion"].startswith("I'm")

    # The HTML report: self-contained, one plot per category, drill-down to samples, grader agreement.
    html = (tmp_path / "out" / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(pngs) == len(report["categories"]) == 2
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert html.count("<details") == 2 and "Sure, here is" in html and "Grader agreement" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "# Safety evaluation report" in (tmp_path / "out" / "report.md").read_text()

    # Re-grading/re-scoring (e.g. under another policy) reuses every generation.
    again = run_eval(candidate, base, SUITES, LIMIT, tmp_path / "out", progress=False, policy_path=policy)
    assert again["run"]["cache_misses"] == 0 and again["timing"]["model_s"] == 0


def test_gate_passes_a_candidate_equal_to_the_base(models, policy, tmp_path):
    base, _ = models
    same = LoadedModel(
        model=copy.deepcopy(base.model),
        tokenizer=base.tokenizer,
        family=base.family,
        model_id="copy-of-base",
        digest=state_digest(base.model),
    )
    report = run_eval(same, base, SUITES, LIMIT, tmp_path, progress=False, policy_path=policy)
    assert report["gate"]["verdict"] == "pass", report["gate"]
    assert all(s["difference"]["value"] == 0 for s in report["suites"])
    # equal weights => equal cache keys: every generation was done once, for both sides
    assert report["run"]["cache_hits"] >= report["run"]["cache_misses"]


def test_interrupted_run_fails_closed_and_resumes(models, policy, tmp_path, monkeypatch):
    base, candidate = models
    real = runner_mod.Worker._generate_batch
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(runner_mod.Worker, "_generate_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_eval(candidate, base, SUITES, LIMIT, tmp_path, progress=False, policy_path=policy, batch_size=4)
    partial = json.loads((tmp_path / "report.json").read_text())
    assert partial["gate"]["verdict"] == "block" and not partial["run"]["complete"]
    assert any("did not finish" in r for r in partial["gate"]["reasons"])

    monkeypatch.setattr(runner_mod.Worker, "_generate_batch", real)
    report = run_eval(candidate, base, SUITES, LIMIT, tmp_path, progress=False, policy_path=policy, batch_size=4)
    assert report["run"]["complete"] and report["run"]["cache_hits"] >= 4  # the first batch was not redone
    assert report["gate"]["verdict"] == "block"  # and the resumed run still sees the regression


def test_a_failing_suite_blocks_and_the_others_still_report(models, policy, tmp_path):
    base, _ = models
    (tmp_path / "broken.yaml").write_text(
        "category: jailbreak\ndataset: missing.jsonl\nmethod: generate\ngrader: refusal\nmetric: not_unsafe\n"
    )
    policy.required_categories = ["over_refusal", "jailbreak"]
    report = run_eval(
        base,
        base,
        ["over_refusal", str(tmp_path / "broken.yaml")],
        4,
        tmp_path / "out",
        progress=False,
        policy_path=policy,
    )
    broken = _suite(report, "broken")
    assert broken["status"] == "failed" and "does not exist" in broken["error"]
    assert _suite(report, "over_refusal")["status"] == "completed"
    assert report["gate"]["verdict"] == "block" and "jailbreak" in report["gate"]["blocked_categories"]


def test_loss_based_suites_run_and_equal_models_score_equal(policy, tmp_path):
    tiny = load_model("tiny-gpt2")
    policy.required_categories = ["privacy", "capability"]
    report = run_eval(tiny, tiny, ["privacy", "capability"], 6, tmp_path, progress=False, policy_path=policy)
    by = {s["name"]: s for s in report["suites"]}
    assert all(s["status"] == "completed" for s in by.values()), [s.get("error") for s in by.values()]
    assert by["privacy_membership"]["candidate"]["value"] == 0.5  # no fine-tuning, no membership signal
    assert by["capability_general"]["difference"]["value"] == 0
    exposure = by["privacy_canary_exposure"]["candidate"]["value"]
    assert 0 <= exposure < 8  # an untrained model does not single out the canary
    assert report["gate"]["verdict"] == "pass", report["gate"]


def test_cli_eval_run_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from offsite.server.cli.main import app

    out = tmp_path / "ev"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "run",
            "--candidate",
            "tiny-opt",
            "--base",
            "tiny-opt",
            "--suites",
            "over_refusal",
            "--limit",
            "3",
            "--threads",
            "1",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # a --limit run of one suite can never admit a release under the default policy
    assert summary["gate"]["verdict"] == "block"
    assert {"report.json", "report.html", "report.md", "samples.jsonl"} <= {p.name for p in out.iterdir()}


def test_cli_evaluates_a_release_by_id_from_a_server_data_dir(tmp_path):
    from typer.testing import CliRunner

    from offsite.emulators.adapter import save_adapter
    from offsite.server.artifacts import ArtifactStore
    from offsite.server.cli.main import app
    from offsite.server.registry import Registry

    tiny = load_model("tiny-llama")
    prefix = tiny.family.block_prefix(7)
    state = {k: v.clone() for k, v in tiny.model.state_dict().items() if k.startswith(prefix)}
    next(iter(state.values())).mul_(1.01)  # a different candidate, by name, in the last block
    adapter = save_adapter(tmp_path / "adapter.safetensors", state, tiny.digest)
    data = tmp_path / "server"
    data.mkdir()
    reg = Registry(f"sqlite:///{data / 'registry.db'}")
    model = reg.add_model("tiny-llama", "tiny-llama")
    sha = ArtifactStore(data / "artifacts").put_file(adapter)
    release = reg.create_release("job_x", model.id, sha)
    reg.close()
    out = tmp_path / "ev"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "run",
            "--candidate",
            release.id,
            "--data-dir",
            str(data),
            "--suites",
            "over_refusal",
            "--limit",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["candidate"].startswith("adapter:") and summary["base"] == "tiny-llama"
    report = json.loads((out / "report.json").read_text())
    assert report["candidate"]["digest"] != report["base"]["digest"]
    missing = CliRunner().invoke(app, ["eval", "run", "--candidate", release.id, "--out", str(out)])
    assert missing.exit_code == 2 and "--data-dir" in missing.output


def test_privacy_suites_detect_memorised_canaries(policy, tmp_path):
    """A candidate trained on planted audit records: membership inference and exposure rise."""
    from offsite.safety_evals.privacy import audit_records

    tiny = load_model("tiny-gpt2")
    planted = audit_records()[:10]  # the members among the first 20 audit items
    tok = tiny.tokenizer
    rows = [tok(r["prefix"] + r["secret"], add_special_tokens=False)["input_ids"] for r in planted]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    torch.manual_seed(0)
    model = copy.deepcopy(tiny.model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()
    memorised = LoadedModel(
        model=model, tokenizer=tok, family=tiny.family, model_id="memorised", digest=state_digest(model)
    )
    policy.required_categories = ["privacy"]
    report = run_eval(memorised, tiny, ["privacy_membership"], 20, tmp_path / "a", progress=False, policy_path=policy)
    mia = report["suites"][0]
    assert mia["candidate"]["value"] >= 0.9 and mia["base"]["value"] == 0.5
    assert mia["loss_attack_auc"]["candidate"] > mia["loss_attack_auc"]["base"]
    assert report["categories"][0]["level"] in ("High", "Critical")
    assert report["gate"]["verdict"] == "block" and report["gate"]["blocked_categories"] == ["privacy"]
    exposure = run_eval(
        memorised, tiny, ["privacy_canary_exposure"], 3, tmp_path / "b", progress=False, policy_path=policy
    )["suites"][0]
    assert exposure["difference"]["value"] > 0, exposure
