"""Decompression before verification (issue 10, item 4): a small .tar.gz that would expand to
256 MiB is refused from its manifest and signature, and nothing of it is written to disk:
not by the library, not by the server's RegisterEmulator, not in the system temp dir."""

from __future__ import annotations

import base64
import io
import json
import resource
import signal
import tarfile
import tempfile
from pathlib import Path

import grpc
import pytest

from offsite.emulators.bundle import BundleError, extract_bundle, load_bundle, verify_bundle
from offsite.emulators.bundle_format import BUNDLE_FORMAT
from offsite.emulators.signing import generate_signing_key, load_private_key, sign

BIG = 256 << 20  # what the archive would expand to


class _Zeros(io.RawIOBase):
    """`n` zero bytes as a file object, so the bomb is built without 256 MiB on disk."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _manifest(claimed_size: int) -> bytes:
    manifest = {
        "format": BUNDLE_FORMAT,
        "files": {"emulator.safetensors": {"size": claimed_size, "sha256": "0" * 64}},
        "base_model": {"id": "tiny-llama", "digest": "", "family": "llama"},
    }
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def make_bomb(path: Path, signing_key: Path, claimed_size: int) -> Path:
    """A .tar.gz: 256 MiB of zeros first (as a sorted store tar would put emulator.safetensors
    before manifest.json), then a manifest claiming `claimed_size`, signed with `signing_key`."""
    manifest = _manifest(claimed_size)
    sig = base64.b64encode(sign(load_private_key(signing_key), manifest)) + b"\n"
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:  # ~1.2 MB, like the probe's 1.4 MB
        info = tarfile.TarInfo("emulator.safetensors")
        info.size = BIG
        tf.addfile(info, io.BufferedReader(_Zeros(BIG), 1 << 20))
        for name, data in (("manifest.json", manifest), ("manifest.sig", sig)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _bytes_under(root: Path, skip: Path | None = None) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p != skip)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_signing_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def attacker_keys(tmp_path_factory):
    return generate_signing_key(tmp_path_factory.mktemp("attacker"))


@pytest.fixture(scope="module")
def bombs(tmp_path_factory, keys, attacker_keys):
    root = tmp_path_factory.mktemp("bombs")
    resigned = make_bomb(root / "resigned.tar.gz", attacker_keys[0], BIG)  # another key
    lying = make_bomb(root / "lying.tar.gz", keys[0], 1024)  # right key, the member is larger
    return resigned, lying


@pytest.fixture
def system_tmp(tmp_path, monkeypatch):
    """The system temp dir, pointed at an empty folder so a test can see what lands there,
    and a 4 MiB cap on any file this process writes while the test runs: expanding the bomb
    anywhere, even briefly, fails with EFBIG instead of passing unseen."""
    path = tmp_path / "system-tmp"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, limits[1]))
    try:
        yield path
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_the_file_size_cap_catches_a_large_write(system_tmp):
    with pytest.raises(OSError), open(system_tmp / "big", "wb") as fh:
        fh.write(bytes(8 << 20))


def test_the_bomb_is_small_and_would_expand_to_hundreds_of_mb(bombs):
    for bomb in bombs:
        assert bomb.stat().st_size < 2 << 20
        with tarfile.open(bomb) as tf:
            assert sum(m.size for m in tf.getmembers()) > BIG


def test_another_signer_is_refused_before_anything_is_written(bombs, keys, tmp_path, system_tmp):
    resigned, _ = bombs
    with pytest.raises(BundleError, match="manifest.sig"):
        verify_bundle(resigned, keys[1])
    with pytest.raises(BundleError, match="manifest.sig"):
        extract_bundle(resigned, tmp_path / "out", keys[1])
    with pytest.raises(BundleError, match="manifest.sig"):
        load_bundle(resigned, keys[1])
    assert not (tmp_path / "out").exists()
    assert _bytes_under(tmp_path) == 0 and list(system_tmp.iterdir()) == []


def test_extraction_is_bounded_by_the_signed_sizes(bombs, keys, tmp_path, system_tmp):
    _, lying = bombs
    for action in (
        lambda: verify_bundle(lying, keys[1]),
        lambda: extract_bundle(lying, tmp_path / "out", keys[1]),
        lambda: load_bundle(lying, keys[1]),
    ):
        with pytest.raises(BundleError, match=rf"emulator\.safetensors: {BIG} bytes, the manifest says 1024"):
            action()
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [system_tmp]
    assert _bytes_under(tmp_path) == 0 and list(system_tmp.iterdir()) == []


def test_register_emulator_refuses_the_bomb_without_expanding_it(bombs, keys, tmp_path, system_tmp):
    """A real server on loopback: upload the bomb as staff, then RegisterEmulator."""
    from offsite.protos.channel import open_channel
    from offsite.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, models_pb2, models_pb2_grpc
    from offsite.server.app import ServerThread
    from offsite.server.state import ServerConfig

    data_dir = tmp_path / "data"
    with ServerThread(ServerConfig(data_dir=data_dir, port=0)) as srv:
        state = srv.server.state
        model = state.registry.add_model("bomb-base", "tiny-llama")
        # The lying bomb signed with the server's own key, so the size bound (not only the signature) is tested.
        lying = make_bomb(tmp_path / "lying-server.tar.gz", state.signing_key, 1024)
        channel = open_channel(srv.address, srv.admin_token)
        for bomb in (bombs[0], lying):
            data = bomb.read_bytes()
            ref = artifacts_pb2_grpc.ArtifactsStub(channel).Upload(
                iter([artifacts_pb2.UploadRequest(kind="bundle", name=bomb.name, data=data)])
            )
            before = _bytes_under(data_dir)
            with pytest.raises(grpc.RpcError) as e:
                models_pb2_grpc.EmulatorsStub(channel).RegisterEmulator(
                    models_pb2.RegisterEmulatorRequest(model=model.id, bundle_sha256=ref.sha256)
                )
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("manifest.sig" if bomb is bombs[0] else "the manifest says 1024") in e.value.details()
            # Nothing was expanded: the data dir grew by a few KB of registry writes at most.
            assert _bytes_under(data_dir) - before < 1 << 20
            assert max(p.stat().st_size for p in data_dir.rglob("*") if p.is_file()) < 2 << 20
        channel.close()
    assert list(system_tmp.iterdir()) == []
