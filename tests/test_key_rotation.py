"""Signing-key rotation (issue 15, section 4): manifests name their key id, `offsite-admin keys
rotate` signs new bundles with a new key while bundles signed before keep verifying (on the
server, for the job runner, for clients that pinned the old key), and a bundle signed by a
key nobody holds fails closed naming its key id. Real keys, real signatures, tiny bundles, a
real server on loopback."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from offsite.client.fetch import FetchError, enroll, fetch_bundle
from offsite.emulators.bundle_format import BundleError, extract_bundle, verify_bundle
from offsite.emulators.keyring import KEYRING_DIR, manifest_key_id, public_key_file
from offsite.emulators.signing import generate_signing_key, key_id, load_private_key, load_public_key, sign
from offsite.protos.channel import open_channel
from offsite.protos.v1 import admin_pb2, admin_pb2_grpc, artifacts_pb2, artifacts_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from offsite.protos.v1 import models_pb2, models_pb2_grpc
from offsite.server.app import ServerThread
from offsite.server.artifacts import ArtifactStore
from offsite.server.cli.main import app as admin_app
from offsite.server.hooks import build_emulator
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _resign(src: Path, dest: Path, key_path: Path, signer: dict | None) -> Path:
    """A copy of bundle `src` whose manifest carries `signer` (None: no signer at all, as the
    oldest manifests) and is signed with `key_path`."""
    shutil.copytree(src, dest)
    manifest = _manifest(src)
    manifest.pop("signer", None)
    if signer is not None:
        manifest["signer"] = signer
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (dest / "manifest.json").write_bytes(data)
    (dest / "manifest.sig").write_bytes(base64.b64encode(sign(load_private_key(key_path), data)) + b"\n")
    return dest


def _upload(channel, tar: Path) -> str:
    chunks = [
        artifacts_pb2.UploadRequest(kind="bundle", name=tar.name),
        artifacts_pb2.UploadRequest(data=tar.read_bytes()),
    ]
    return artifacts_pb2_grpc.ArtifactsStub(channel).Upload(iter(chunks)).sha256


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """A server whose key signed bundle A, then `offsite-admin keys rotate --data-dir` while it
    runs, then bundle B built with the server's (now new) key; a job on each."""
    tiny = tiny_bundle()
    root = tmp_path_factory.mktemp("rotation")
    data = root / "srv"
    (data / "keys").mkdir(parents=True)
    shutil.copy(tiny.signing_key, data / "keys" / "signing.key")
    shutil.copy(tiny.public_key, data / "keys" / "signing.pub")
    with ServerThread(ServerConfig(data_dir=data, port=0)) as srv:
        state = srv.server.state
        admin = open_channel(srv.address, srv.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        emulators = models_pb2_grpc.EmulatorsStub(admin)
        emu_a = emulators.RegisterEmulator(
            models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=_upload(admin, tiny.tar_path))
        )
        out = CliRunner().invoke(admin_app, ["keys", "rotate", "--data-dir", str(data), "--json"])
        assert out.exit_code == 0, out.output
        rotation = json.loads(out.stdout)
        # What BuildEmulator does: the builder hook signs with the server's signing.key.
        bundle_b = root / "bundle-b"
        build_emulator({"model": "tiny-llama"}, state.signing_key, bundle_b, lambda *_: None)
        store = ArtifactStore(root / "store")
        tar_b = store.path(store.put_dir_as_tar(bundle_b))
        emu_b = emulators.RegisterEmulator(
            models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=_upload(admin, tar_b))
        )
        jobs = jobs_pb2_grpc.JobsStub(admin)
        job_a = jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu_a.id))).id
        job_b = jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu_b.id))).id
        token = (
            admin_pb2_grpc.AdminStub(admin)
            .CreateToken(admin_pb2.CreateTokenRequest(name="alice", role="data-owner", jobs=[job_a, job_b]))
            .secret
        )
        srv.ctx = dict(
            state=state,
            admin=admin,
            rotation=rotation,
            tiny=tiny,
            bundle_b=bundle_b,
            tar_b=tar_b,
            emu_a=emu_a,
            emu_b=emu_b,
            job_a=job_a,
            job_b=job_b,
            token=token,
            keys=data / "keys",
        )
        yield srv
        admin.close()


def test_the_manifest_names_the_key_id_and_new_bundles_use_the_new_key(rotated):
    c = rotated.ctx
    old_id, new_id = c["rotation"]["previous_key_id"], c["rotation"]["key_id"]
    assert old_id == key_id(load_public_key(c["tiny"].public_key)) != new_id
    assert _manifest(c["tiny"].bundle_dir)["signer"]["key_id"] == old_id
    assert _manifest(c["bundle_b"])["signer"]["key_id"] == new_id == key_id(load_public_key(c["keys"] / "signing.pub"))
    assert sorted(p.stem for p in (c["keys"] / KEYRING_DIR).glob("*.pub")) == sorted([old_id, new_id])
    assert (c["keys"] / "signing.key").stat().st_mode & 0o777 == 0o600
    assert not (c["keys"] / KEYRING_DIR / ".new").exists()


def test_old_and_new_bundles_verify_with_the_keyring_and_each_only_with_its_key(rotated, tmp_path):
    c = rotated.ctx
    old_id, new_id = c["rotation"]["previous_key_id"], c["rotation"]["key_id"]
    ring = c["keys"] / KEYRING_DIR
    for keys in (ring, c["keys"]):
        assert verify_bundle(c["tiny"].bundle_dir, keys)["signer"]["key_id"] == old_id
        assert verify_bundle(c["bundle_b"], keys)["signer"]["key_id"] == new_id
    assert extract_bundle(c["tar_b"], tmp_path / "b", ring)["signer"]["key_id"] == new_id  # the streamed tar path
    # One key alone verifies its own bundles; the other's fail closed, naming the key id they need.
    with pytest.raises(BundleError, match=f"signed by key id {old_id}.*wrong public key"):
        verify_bundle(c["tiny"].bundle_dir, c["keys"] / "signing.pub")
    with pytest.raises(BundleError, match=f"signed by key id {new_id}"):
        verify_bundle(c["bundle_b"], ring / f"{old_id}.pub")
    with pytest.raises(BundleError, match=f"key id {new_id}"):
        extract_bundle(c["tar_b"], tmp_path / "refused", ring / f"{old_id}.pub")
    assert not (tmp_path / "refused").exists()


def test_manifests_without_a_key_id_verify_as_before(rotated, tmp_path):
    c = rotated.ctx
    tiny, ring = c["tiny"], c["keys"] / KEYRING_DIR
    fingerprint_only = _resign(
        tiny.bundle_dir,
        tmp_path / "fp",
        tiny.signing_key,
        {"ed25519_sha256": _manifest(tiny.bundle_dir)["signer"]["ed25519_sha256"]},
    )
    no_signer = _resign(tiny.bundle_dir, tmp_path / "none", tiny.signing_key, None)
    assert manifest_key_id(_manifest(fingerprint_only)) == c["rotation"]["previous_key_id"]
    assert manifest_key_id(_manifest(no_signer)) is None
    for bundle in (fingerprint_only, no_signer):
        verify_bundle(bundle, tiny.public_key)
        verify_bundle(bundle, ring)  # no key id: each key of the ring is tried
    with pytest.raises(BundleError, match="signature does not match"):
        verify_bundle(no_signer, c["keys"] / "signing.pub")
    # A manifest that lies about its key id selects a key that cannot verify it.
    liar = _resign(tiny.bundle_dir, tmp_path / "liar", tiny.signing_key, {"key_id": c["rotation"]["key_id"]})
    with pytest.raises(BundleError, match="signature does not match"):
        verify_bundle(liar, ring)


def test_the_server_keeps_serving_each_bundle_with_its_own_key(rotated, tmp_path):
    c = rotated.ctx
    state, ring = c["state"], c["keys"] / KEYRING_DIR
    old_id, new_id = c["rotation"]["previous_key_id"], c["rotation"]["key_id"]
    # The job runner gets the key of the job's bundle.
    assert state.public_key_for(state.registry.get_emulator(c["emu_a"].id).manifest) == ring / f"{old_id}.pub"
    assert state.public_key_for(state.registry.get_emulator(c["emu_b"].id).manifest) == ring / f"{new_id}.pub"
    # A data owner who pinned the old signing.pub keeps enrolling in and fetching the old bundle...
    old_pin = c["tiny"].public_key
    a = enroll(rotated.address, c["token"], c["job_a"], home=tmp_path / "h1", public_key=old_pin)
    assert Path(a.public_key_path).read_bytes() == old_pin.read_bytes()
    assert fetch_bundle(a, c["token"], cache_dir=tmp_path / "cache").manifest["signer"]["key_id"] == old_id
    # ...is refused the new one, told which key id it needs...
    with pytest.raises(FetchError, match=f"key id {new_id}.*differs"):
        enroll(rotated.address, c["token"], c["job_b"], home=tmp_path / "h1", public_key=old_pin)
    # ...and takes both once it pins a directory holding old and new keys.
    b = enroll(rotated.address, c["token"], c["job_b"], home=tmp_path / "h2", public_key=ring)
    assert Path(b.public_key_path).read_bytes() == (c["keys"] / "signing.pub").read_bytes()
    assert fetch_bundle(b, c["token"], cache_dir=tmp_path / "cache").manifest["signer"]["key_id"] == new_id


def test_a_bundle_of_an_unknown_key_is_refused_naming_its_key_id(rotated, tmp_path):
    c = rotated.ctx
    state = c["state"]
    stranger = generate_signing_key(tmp_path / "stranger")[0]
    sid = key_id(load_private_key(stranger))
    foreign = _resign(c["tiny"].bundle_dir, tmp_path / "foreign", stranger, {"key_id": sid})
    store = ArtifactStore(tmp_path / "store")
    sha = _upload(c["admin"], store.path(store.put_dir_as_tar(foreign)))
    with pytest.raises(grpc.RpcError) as e:
        models_pb2_grpc.EmulatorsStub(c["admin"]).RegisterEmulator(
            models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=sha)
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and sid in e.value.details()
    # An emulator row naming a key the server lost (a restore without keyring/): Enroll says which.
    emu = state.registry.add_emulator(state.registry.get_model("tiny").id, sha, {}, {"signer": {"key_id": sid}})
    job = (
        jobs_pb2_grpc.JobsStub(c["admin"])
        .CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
        .id
    )
    with pytest.raises(grpc.RpcError) as e:
        jobs_pb2_grpc.JobsStub(c["admin"]).Enroll(jobs_pb2.EnrollRequest(job_id=job, data_owner="bob"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and sid in e.value.details()
    with pytest.raises(ValueError, match=sid):
        public_key_file(c["keys"], {"signer": {"key_id": sid}})


def test_keys_rotate_and_list_on_the_command_line(tmp_path):
    run = CliRunner().invoke
    keys = tmp_path / "keys"
    first = json.loads(run(admin_app, ["keys", "init", "--dir", str(keys), "--json"]).stdout)["key_id"]
    rotated = run(admin_app, ["keys", "rotate", "--dir", str(keys), "--json"])
    assert rotated.exit_code == 0, rotated.output
    second = json.loads(rotated.stdout)
    assert second["previous_key_id"] == first != second["key_id"]
    listed = json.loads(run(admin_app, ["keys", "list", "--dir", str(keys), "--json"]).stdout)
    assert listed["key_id"] == second["key_id"]
    assert {k["key_id"]: k["current"] for k in listed["keys"]} == {first: False, second["key_id"]: True}
    # Bad input: nothing to rotate, or both --dir and --data-dir; nothing is written.
    missing = run(admin_app, ["keys", "rotate", "--dir", str(tmp_path / "none"), "--json"])
    assert missing.exit_code != 0 and "keys init" in json.loads(missing.stdout)["error"]
    assert not (tmp_path / "none").exists()
    both = run(admin_app, ["keys", "rotate", "--dir", str(keys), "--data-dir", str(tmp_path), "--json"])
    assert both.exit_code != 0 and "either --dir" in json.loads(both.stdout)["error"]
    assert json.loads(run(admin_app, ["keys", "list", "--dir", str(keys), "--json"]).stdout) == listed


def test_a_local_job_reusing_a_bundle_from_before_a_rotation_verifies_it_with_its_key(tmp_path):
    from offsite.emulators.keyring import rotate_signing_key
    from offsite.server.federation.job_runner import prepare_local_job

    first = prepare_local_job(tmp_path, model="tiny-llama", clients=2, rounds=1)
    rotation = rotate_signing_key(tmp_path / "keys")
    again = prepare_local_job(tmp_path, model="tiny-llama", clients=2, rounds=1)  # the cached bundle, old key
    assert again.cfg.bundle == first.cfg.bundle
    assert (
        Path(again.cfg.public_key) == (tmp_path / "keys" / KEYRING_DIR / f"{rotation['previous_key_id']}.pub").resolve()
    )
    assert again.settings.public_key == again.cfg.public_key
    verify_bundle(again.cfg.bundle, again.cfg.public_key)
