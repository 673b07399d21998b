"""Merging releases on a real server (loopback), through `offsite-admin releases merge`:
a pending-gate release with its parents, the merged adapter exactly the library's, gated like
any release; every bad request refused with nothing created."""

from __future__ import annotations

import json
import re

import grpc
import pytest
import torch
from typer.testing import CliRunner

from offsite.emulators.adapter import load_adapter, save_adapter
from offsite.emulators.merge import MergeConfig, merge_adapters
from offsite.emulators.models import load_model
from offsite.protos.channel import open_channel
from offsite.protos.v1 import admin_pb2, admin_pb2_grpc, evals_pb2, evals_pb2_grpc, operations_pb2, operations_pb2_grpc
from offsite.protos.v1 import releases_pb2, releases_pb2_grpc
from offsite.server.app import ServerThread
from offsite.server.cli.main import app
from offsite.server.state import ServerConfig

pytestmark = pytest.mark.e2e
runner = CliRunner()


def pass_eval_runner(candidate, base, suites, limit, out_dir, progress=True, policy_path=None):
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "run": {"complete": True},
        "categories": [{"name": "disallowed_content", "level": "Low"}],
        "gate": {"verdict": "pass", "blocked_categories": []},
    }
    (out_dir / "report.json").write_text(json.dumps(report))
    (out_dir / "report.html").write_text("<html><body>scorecard</body></html>")
    return report


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerThread(
        ServerConfig(data_dir=tmp_path_factory.mktemp("srv"), port=0, eval_runner=pass_eval_runner)
    ).start()
    yield s
    s.stop()


def _adapter(loaded, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prefixes = tuple(loaded.family.block_prefix(i) for i in (0, 1, 6, 7))
    return {
        n: p.detach() + 0.02 * torch.randn(p.shape, generator=g)
        for n, p in loaded.model.named_parameters()
        if n.startswith(prefixes)
    }


_LOADED: dict = {}


def _release(server, tmp_path, model_name: str, source: str, seed: int, status: str) -> str:
    """A release as a finished job leaves it: its adapter in the store, a registry row."""
    st = server.server.state
    loaded = _LOADED.get(source) or _LOADED.setdefault(source, load_model(source))
    try:
        model = st.registry.get_model(model_name)
    except LookupError:
        model = st.registry.add_model(model_name, source, family=loaded.family.name, digest=loaded.digest)
    path = save_adapter(tmp_path / f"{model_name}-{seed}.safetensors", _adapter(loaded, seed), loaded.digest)
    sha = st.store.put_file(path)
    st.registry.add_artifact(sha, st.store.size(sha), "adapter", path.name)
    return st.registry.create_release("", model.id, sha, {"seed": seed}, status=status).id


def cli(server, *args, token=None):
    return runner.invoke(app, ["--server", server.address, "--token", token or server.admin_token, *args])


def _counts(server):
    reg = server.server.state.registry
    return len(reg.list_releases()), len(reg.list_operations(kind="release-merge"))


def test_merge_makes_a_pending_gate_release_with_its_parents(server, tmp_path):
    a = _release(server, tmp_path, "tiny", "tiny-llama", 1, "approved")
    b = _release(server, tmp_path, "tiny", "tiny-llama", 2, "released")
    res = cli(server, "releases", "merge", a, b, "--method", "ties", "--density", "0.3", "--weights", "1,0.5", "--json")
    assert res.exit_code == 0, res.output
    op = json.loads(res.output)
    assert op["state"] == "succeeded" and op["resource"].startswith("releases/")
    new_id = op["resource"].split("/", 1)[1]

    got = cli(server, "releases", "get", new_id, "--json")
    rel = json.loads(got.output)
    assert rel["status"] == "pending-gate" and rel["parent_ids"] == [a, b]
    assert rel["metrics"]["merge"]["method"] == "ties" and rel["metrics"]["merge"]["density"] == 0.3

    # The stored adapter is exactly what the library makes from the parents' adapters.
    st = server.server.state
    parents = [load_adapter(st.store.path(st.registry.get_release(i).adapter_sha256)) for i in (a, b)]
    expected, _ = merge_adapters(
        load_model("tiny-llama"), parents, MergeConfig("ties", weights=(1.0, 0.5), density=0.3)
    )
    merged, meta = load_adapter(st.store.path(st.registry.get_release(new_id).adapter_sha256))
    assert set(merged) == set(expected) and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert json.loads(meta["parents"]) == [a, b]

    # Gated like any release: the gate runs on it (plugged into its base) and its verdict applies.
    admin = open_channel(server.address, server.admin_token)
    op = evals_pb2_grpc.EvalsStub(admin).RunEval(evals_pb2.RunEvalRequest(candidate=new_id))
    *_, last = operations_pb2_grpc.OperationsStub(admin).WatchOperation(operations_pb2.WatchOperationRequest(id=op.id))
    assert last.state == operations_pb2.OPERATION_STATE_SUCCEEDED, last.error
    assert st.registry.get_release(new_id).gate_verdict == "pass"
    report = st.registry.get_eval_report(st.registry.get_release(new_id).gate_report_id)
    assert report.summary["lineage"] == {"parents": [a, b], "merge": rel["metrics"]["merge"]}


def test_bad_merges_are_refused_and_create_nothing(server, tmp_path):
    a = _release(server, tmp_path, "tiny", "tiny-llama", 3, "approved")
    b = _release(server, tmp_path, "tiny", "tiny-llama", 4, "approved")
    pending = _release(server, tmp_path, "tiny", "tiny-llama", 5, "pending-gate")
    other = _release(server, tmp_path, "tiny-gpt", "tiny-gpt2", 6, "approved")
    before = _counts(server)
    cases = [
        ((a, other), (), rf"release {other} is of base model 'tiny-gpt'.*release {a} of 'tiny'"),
        ((a, pending), (), rf"{pending} \(pending-gate\).*--allow-ungated"),
        ((a, b), ("--weights", "1,2,3"), "3 weights for 2 adapters"),
        ((a, b), ("--weights", "1,x"), "expected comma-separated numbers"),
        ((a, b), ("--method", "slerp"), "not one of average, task-arithmetic, ties, dare"),
        ((a,), (), "at least two releases"),
    ]
    for ids, extra, match in cases:
        res = cli(server, "releases", "merge", *ids, *extra, "--json")
        assert res.exit_code != 0, (ids, extra, res.output)
        err = json.loads(res.output.strip().splitlines()[-1])["error"]
        assert re.search(match, err), (match, err)
    assert _counts(server) == before


def test_allow_ungated_is_for_admins_and_audited(server, tmp_path):
    a = _release(server, tmp_path, "tiny", "tiny-llama", 7, "approved")
    blocked = _release(server, tmp_path, "tiny", "tiny-llama", 8, "blocked")
    admin = open_channel(server.address, server.admin_token)
    partner = admin_pb2_grpc.AdminStub(admin).CreateToken(admin_pb2.CreateTokenRequest(name="pat", role="partner"))
    owner = admin_pb2_grpc.AdminStub(admin).CreateToken(admin_pb2.CreateTokenRequest(name="dot", role="data-owner"))
    before = _counts(server)
    res = cli(server, "releases", "merge", a, blocked, "--allow-ungated", "--json", token=partner.secret)
    assert res.exit_code != 0 and "admins only" in res.output
    with pytest.raises(grpc.RpcError) as e:
        releases_pb2_grpc.ReleasesStub(open_channel(server.address, owner.secret)).MergeReleases(
            releases_pb2.MergeReleasesRequest(release_ids=[a, blocked])
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _counts(server) == before

    # A partner merges gated releases; an admin may merge ungated ones, and that is audited.
    c = _release(server, tmp_path, "tiny", "tiny-llama", 9, "approved")
    ok = cli(server, "releases", "merge", a, c, "--method", "average", "--json", token=partner.secret)
    assert ok.exit_code == 0 and json.loads(ok.output)["state"] == "succeeded", ok.output
    res = cli(
        server, "releases", "merge", a, blocked, "--method", "dare", "--drop-rate", "0.3", "--allow-ungated", "--json"
    )
    assert res.exit_code == 0, res.output
    new_id = json.loads(res.output)["resource"].split("/", 1)[1]
    rel = server.server.state.registry.get_release(new_id)
    assert (
        rel.status == "pending-gate" and rel.parent_ids == [a, blocked] and rel.metrics["ungated_parents"] == [blocked]
    )
    audit = [r for r in server.server.state.registry.list_audit(limit=50) if r.outcome == "allow-ungated"]
    assert audit and blocked in audit[0].detail and "blocked" in audit[0].detail


def test_merge_out_writes_the_merged_adapter(server, tmp_path):
    a = _release(server, tmp_path, "tiny", "tiny-llama", 3, "approved")
    b = _release(server, tmp_path, "tiny", "tiny-llama", 4, "approved")
    out = tmp_path / "merged.safetensors"
    res = cli(server, "releases", "merge", a, b, "--method", "average", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    st = server.server.state
    new_id = summary["resource"].split("/", 1)[1]
    assert (
        summary["adapter_path"] == str(out)
        and out.read_bytes() == st.store.path(st.registry.get_release(new_id).adapter_sha256).read_bytes()
    )
    # --out into a folder that does not exist is refused before anything is created
    before = _counts(server)
    bad = cli(server, "releases", "merge", a, b, "--out", str(tmp_path / "no" / "such" / "x.safetensors"), "--json")
    assert bad.exit_code != 0 and "does not exist" in bad.output and _counts(server) == before
