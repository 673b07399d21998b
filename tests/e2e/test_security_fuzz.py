"""The outside probe as a test: a partner client built from the `.proto` files alone.

The protos are compiled here (grpc_tools.protoc) into a fresh descriptor pool, so the client
shares no code with the server: it enumerates every offsite.v1 method, runs the role x
method matrix, then sends a bounded set of malformed requests to each method, drawn by
hypothesis from the message descriptors (long strings, server paths, NUL bytes, extreme
numbers, NaN, unknown enum values, Structs nested deep, garbage bytes). It asserts:

- no UNKNOWN or INTERNAL status (every bad input gets a code a person can act on);
- no request string of 100+ characters is echoed back in an error;
- nothing is created outside the data dir (the path-like strings point into a watched dir).

Bounded for CI (2 cores): a fixed number of examples per method, derandomized.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from offsite.server.app import ServerThread  # noqa: E402
from offsite.server.state import ServerConfig  # noqa: E402

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_PER_METHOD = 20
ECHO_PROBE = 100  # an echo is this many characters of one request string in an error's details


# ---- the client, from the protos alone -------------------------------------------------------------------
def _compile_protos(out: Path) -> descriptor_pool.DescriptorPool:
    import grpc_tools

    protos = sorted((ROOT / "protos").glob("offsite/v1/*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    fds_path = out / "offsite.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{include}",
            "--include_imports",
            f"--descriptor_set_out={fds_path}",
            *map(str, protos),
        ],
        check=True,
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(fds_path.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    return pool


def _methods(pool):
    out = []
    for name in ("admin", "artifacts", "evals", "jobs", "models", "operations", "releases"):
        fd = pool.FindFileByName(f"offsite/v1/{name}.proto")
        for service in fd.services_by_name.values():
            for m in service.methods:
                out.append((f"/{service.full_name}/{m.name}", m))
    return out


def _stub(channel, path, method, token):
    resp = message_factory.GetMessageClass(method.output_type)
    kw = dict(
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=resp.FromString,
    )
    md = [("authorization", f"Bearer {token}")] if token else None
    if method.client_streaming:
        fn = channel.stream_unary(path, **kw)
        return lambda msgs: fn(iter(msgs), metadata=md, timeout=15)
    if method.server_streaming:
        fn = channel.unary_stream(path, **kw)
        return lambda msg: list(fn(msg, metadata=md, timeout=15))
    fn = channel.unary_unary(path, **kw)
    return lambda msg: fn(msg, metadata=md, timeout=15)


# ---- strategies from descriptors ---------------------------------------------------------------------------
FD = descriptor_pb2.FieldDescriptorProto


def _strings(seeds: list[str], outside: Path):
    paths = [
        str(outside / "x"),
        str(outside / "x" / "pyproject.toml"),
        "/etc/passwd",
        "../../etc/passwd",
        "..",
        "a/../../b",
        "/",
        "x\x00y",
        "rel_../../x",
        "job_" + "1" * 12,
        "0" * 64,
        "tiny-llama",
    ]
    return st.one_of(
        st.text(max_size=24),
        st.sampled_from(paths + seeds),
        st.text(alphabet="ab/._-", min_size=ECHO_PROBE + 50, max_size=3000),
    )


def _json_values():
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
        st.sampled_from(["/etc/passwd", "../../x"]),
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
        max_leaves=12,
    )


def _deep_dict(depth: int) -> dict:
    d: dict = {"leaf": 1}
    for _ in range(depth):
        d = {"a": d}
    return d


def _field(f, strings, depth):
    t = f.type
    if t == FD.TYPE_STRING:
        return strings
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if t == FD.TYPE_DOUBLE else 32)
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 2**31 - 1]))
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-1, 0, 2**62, 2**63 - 1]))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-5, 1000))
    return _message(f.message_type, strings, depth + 1)


def _message(desc, strings, depth=0):
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == "google.protobuf.Struct":
        struct_dicts = st.one_of(
            st.dictionaries(st.text(max_size=16) | strings, _json_values(), max_size=4),
            st.integers(20, 40).map(_deep_dict),
        )
        return struct_dicts.map(lambda d: json_format.ParseDict(d, cls()))
    if desc.full_name.startswith("google.protobuf.") or depth > 2:
        return st.just(cls())
    fields = {}
    for f in desc.fields:
        one = _field(f, strings, depth)
        fields[f.name] = st.none() | (st.lists(one, max_size=3) if f.is_repeated else one)

    def build(values: dict):
        msg = cls()
        for f in desc.fields:
            v = values[f.name]
            if v is None:
                continue
            if f.is_repeated:
                target = getattr(msg, f.name)
                for item in v:
                    target.add().CopyFrom(item) if f.type == FD.TYPE_MESSAGE else target.append(item)
            elif f.type == FD.TYPE_MESSAGE:
                getattr(msg, f.name).CopyFrom(v)
            else:
                setattr(msg, f.name, v)
        return msg

    return st.fixed_dictionaries(fields).map(build)


def _request_strings(msg) -> list[str]:
    out = []
    for f, v in msg.ListFields():
        for item in v if f.is_repeated else [v]:
            if isinstance(item, str):
                out.append(item)
            elif hasattr(item, "ListFields"):
                out.extend(_request_strings(item))
    if msg.DESCRIPTOR.full_name == "google.protobuf.Struct":
        out.extend(s for s in json.dumps(json_format.MessageToDict(msg)).split('"') if len(s) >= ECHO_PROBE)
    return out


# ---- the world ----------------------------------------------------------------------------------------------
def _noop_runner(*_a, **_k):
    return {"gate": {"verdict": "block"}, "categories": []}


def _noop_builder(cfg, signing_key, out, on_progress):
    raise ValueError("the probe does not build emulators")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    pool = _compile_protos(root / "compiled")
    outside = root / "outside"
    cfg = ServerConfig(
        data_dir=root / "srv",
        port=0,
        background_tasks=[],
        job_runner=_noop_runner,
        eval_runner=_noop_runner,
        emulator_builder=_noop_builder,
        release_exporter=_noop_runner,
    )
    server = ServerThread(cfg).start()
    state = server.server.state
    reg = state.registry
    model = reg.add_model("probe-model", "tiny-llama")
    sha = state.store.put_bytes(b"not a bundle")
    reg.add_artifact(sha, state.store.size(sha), "bundle", "b.tar")
    emu = reg.add_emulator(model.id, sha, {}, {})
    job = reg.add_job("probe-job", model.id, emu.id, {"rounds": 1})
    rel = reg.create_release(job.id, model.id, sha)
    secret = lambda name, role, jobs=(): state.auth.create_token(name, role, list(jobs))[0]
    tokens = {
        "admin": server.admin_token,
        "partner": secret("acme", "partner"),
        "data-owner": secret("dora", "data-owner", [job.id]),
        "none": None,
        "bogus": "ofs_" + "x" * 43,
    }
    reg.enroll(
        job.id, "dora", reg.token_by_hash(__import__("hashlib").sha256(tokens["data-owner"].encode()).hexdigest()).id
    )
    seeds = [model.id, model.name, emu.id, job.id, rel.id, sha, "python-reference", "simulation", "admin"]
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield {
        "server": server,
        "pool": pool,
        "outside": outside,
        "tokens": tokens,
        "seeds": seeds,
        "channel": channel,
        "data_dir": Path(state.data_dir),
    }
    server.stop()


def _outcome(call, arg):
    try:
        call(arg)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def test_role_method_matrix_from_the_protos_alone(world):
    from offsite.server.auth import METHOD_ROLES

    wrong = []
    for role, token in world["tokens"].items():
        for path, method in _methods(world["pool"]):
            req = message_factory.GetMessageClass(method.input_type)()
            code, _ = _outcome(_stub(world["channel"], path, method, token), [req] if method.client_streaming else req)
            if token is None or role == "bogus":
                ok = code == grpc.StatusCode.UNAUTHENTICATED
            elif role in METHOD_ROLES.get(path, ()):
                ok = code not in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.UNIMPLEMENTED,
                )
            else:
                ok = code == grpc.StatusCode.PERMISSION_DENIED
            if not ok:
                wrong.append((role, path, code.name))
    assert not wrong, wrong
    assert len(_methods(world["pool"])) == len(METHOD_ROLES)


def _method_ids():
    # Collected without compiling: the method list from the committed descriptors names the same methods.
    from offsite.protos.v1 import (
        admin_pb2,
        artifacts_pb2,
        evals_pb2,
        jobs_pb2,
        models_pb2,
        operations_pb2,
        releases_pb2,
    )

    names = []
    for mod in (admin_pb2, artifacts_pb2, evals_pb2, jobs_pb2, models_pb2, operations_pb2, releases_pb2):
        for service in mod.DESCRIPTOR.services_by_name.values():
            names.extend(f"/{service.full_name}/{m.name}" for m in service.methods)
    return names


@pytest.mark.parametrize("path", _method_ids())
def test_malformed_inputs_get_actionable_codes(world, path):
    method = dict(_methods(world["pool"]))[path]
    strings = _strings(world["seeds"], world["outside"])
    request = _message(method.input_type, strings)
    if method.client_streaming:
        request = st.lists(request, min_size=1, max_size=3)
    role = st.sampled_from(["admin", "admin", "partner", "data-owner"])
    bad: list = []

    @settings(
        max_examples=EXAMPLES_PER_METHOD,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(req=request, who=role)
    def probe(req, who):
        call = _stub(world["channel"], path, method, world["tokens"][who])
        code, details = _outcome(call, req)
        sent = [s for m in (req if isinstance(req, list) else [req]) for s in _request_strings(m)]
        echoed = [s[:40] for s in sent if len(s) >= ECHO_PROBE and s[:ECHO_PROBE] in details]
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) or echoed or len(details) > 1100:
            bad.append((who, code.name, details[:300], echoed))

    probe()
    # Garbage bytes and a Struct nested past protobuf's limit, with and without a token.
    for token in (None, world["tokens"]["admin"]):
        call = _stub(world["channel"], path, method, token)
        for raw in (b"\xff\xff\xff\xff\x0f", b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 8):
            code, details = _outcome(call, [raw] if method.client_streaming else raw)
            expected = grpc.StatusCode.UNAUTHENTICATED if token is None else grpc.StatusCode.INVALID_ARGUMENT
            if code != expected:
                bad.append(("raw", code.name, details[:300], []))
    assert not bad, bad
    assert not world["outside"].exists(), f"{path} created {list(world['outside'].rglob('*'))}"
