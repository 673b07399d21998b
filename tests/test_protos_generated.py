"""The committed offsite.v1 stubs are exactly what protos/generate.py produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("offsite_protos_generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_stubs_changes_nothing(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = _load_generator()
    written = gen.generate(tmp_path)
    committed = ROOT / "protos" / "v1"
    fresh_names = sorted(p.name for p in written)
    committed_names = sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    assert fresh_names == committed_names, "stub files differ: run `python protos/generate.py` and commit"
    for name in fresh_names:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"protos/v1/{name} is stale: run `python protos/generate.py` and commit the result"
        )


def test_every_proto_is_package_offsite_v1():
    for proto in (ROOT / "protos" / "offsite" / "v1").glob("*.proto"):
        assert "package offsite.v1;" in proto.read_text(), proto


def test_stubs_import_as_offsite_protos():
    from offsite.protos.v1 import jobs_pb2, jobs_pb2_grpc

    assert jobs_pb2.DESCRIPTOR.package == "offsite.v1"
    assert hasattr(jobs_pb2_grpc, "JobsStub")
