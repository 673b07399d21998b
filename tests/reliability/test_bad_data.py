"""Bad files a data owner (or an attacker) hands in: training data of every broken kind, and
signed bundles with one bit flipped anywhere in the manifest or its signature, or cut short.
Each is refused with an error naming the file (and line), never half-used: a bundle that
fails leaves nothing at its destination.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from offsite.emulators.bundle_format import MANIFEST, SIGNATURE, BundleError, extract_bundle, verify_bundle
from offsite.emulators.data import DataError, load_examples
from offsite.server.testing import tiny_bundle

# --- training data --------------------------------------------------------------------------

BAD_DATA = {
    "empty.jsonl": (b"", "empty"),
    "blank-lines.jsonl": (b"\n\n   \n", "empty"),
    "binary.jsonl": (b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 8, ":1: not UTF-8"),
    "latin1.txt": ("caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"),
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: not UTF-8"),
    "bad-json-line-3.jsonl": (b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', ":3: invalid JSON"),
    "array-line.jsonl": (b'{"text": "a"}\n[1, 2]\n', ":2: a JSON list"),
    "number-text.jsonl": (b'{"text": 5}\n', ":1: 'text' must be a string"),
    "half-pair.jsonl": (b'{"prompt": "q"}\n', "'prompt' and 'completion'"),
    "unknown-keys.jsonl": (b'{"question": "q", "answer": "a"}\n', "keys ['answer', 'question']"),
    "no-assistant.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "role 'assistant'"),
    "unknown-role.jsonl": (
        b'{"messages": [{"role": "hacker", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
        "role 'hacker'",
    ),
    "role-not-string.jsonl": (b'{"messages": [{"role": 1, "content": "x"}]}\n', "'messages' must be"),
    "messages-empty.jsonl": (b'{"messages": []}\n', "'messages' must be"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_training_data_is_refused_naming_file_and_line(name, tmp_path):
    data, expected = BAD_DATA[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert name in str(e.value) and expected in str(e.value), str(e.value)


def test_an_empty_directory_and_a_missing_path_are_refused(tmp_path):
    with pytest.raises(DataError, match="holds no .jsonl"):
        load_examples(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")


LONG_LINE_MB = 192  # the issue asks for 2 GB; the bound is what matters, not the size


def test_a_very_long_line_is_refused_in_bounded_memory(tmp_path):
    """A single 192 MiB JSONL line: refused at the line cap, without reading it whole.

    Measured in a child process (its peak RSS), reading through offsite.files.read_jsonl
    (what every JSONL reader uses)."""
    path = tmp_path / "long.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"text": "ok"}\n{"text": "')
        block = b"a" * (1 << 20)
        for _ in range(LONG_LINE_MB):
            fh.write(block)
        fh.write(b'"}\n')
    code = (
        "import sys\n"
        "from offsite.files import JsonlError, read_jsonl\n"
        "try:\n"
        "    for _ in read_jsonl(sys.argv[1]): pass\n"
        "    print('ACCEPTED')\n"
        "except JsonlError as e:\n"
        "    print(e)\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
        "print(next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM')) // 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    message, peak_mib = r.stdout.strip().splitlines()[-2], int(r.stdout.strip().splitlines()[-1])
    assert "long.jsonl:2:" in message and "longer than" in message, message
    assert peak_mib < LONG_LINE_MB // 2, f"peak RSS {peak_mib} MiB reading a {LONG_LINE_MB} MiB line"


# --- bundles --------------------------------------------------------------------------------


def _member_span(tar_path: Path, name: str) -> tuple[int, int]:
    with tarfile.open(tar_path) as tf:
        m = tf.getmember(name)
        return m.offset_data, m.size


@pytest.fixture(scope="module")
def bundle():
    b = tiny_bundle()
    verify_bundle(b.tar_path, b.public_key)  # the unflipped one is good
    return b


@pytest.mark.parametrize("member", [MANIFEST, SIGNATURE])
def test_every_single_bit_flip_in_the_manifest_or_signature_fails_closed(member, bundle, tmp_path):
    original = bundle.tar_path.read_bytes()
    start, size = _member_span(bundle.tar_path, member)
    flipped = tmp_path / "flipped.tar"
    accepted = []
    for i in range(start, start + size):
        data = bytearray(original)
        data[i] ^= 0x01 if member == MANIFEST else 0x04  # base64: 0x04 keeps most characters in the alphabet
        flipped.write_bytes(data)
        dest = tmp_path / "out"
        try:
            extract_bundle(flipped, dest, bundle.public_key)
            accepted.append(i - start)
        except BundleError:
            pass
        assert not dest.exists() or (i - start) in accepted, f"byte {i - start}: a refused bundle left {dest}"
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
    # Base64 decoders ignore some bits of the last character; those flips do not change the signature.
    if member == SIGNATURE:
        sig = original[start : start + size]
        assert all(i >= len(sig.rstrip(b"=\n")) - 1 for i in accepted), f"accepted signature flips at {accepted}"
    else:
        assert not accepted, f"{len(accepted)} manifest bytes could be flipped unnoticed: {accepted[:10]}"
    assert not list(tmp_path.glob(".out*")), "a staging directory was left behind"


@pytest.mark.parametrize("sixteenth", range(16))
def test_a_truncated_bundle_fails_closed(sixteenth, bundle, tmp_path):
    data = bundle.tar_path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * sixteenth // 16])
    with pytest.raises(BundleError):
        extract_bundle(cut, tmp_path / "out", bundle.public_key)
    with pytest.raises(BundleError):
        verify_bundle(cut, bundle.public_key)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_manifest_edited_and_left_unsigned_names_the_problem(bundle, tmp_path):
    """The case a person most likely makes by hand: pretty-printing the manifest."""
    import io

    out = tmp_path / "edited.tar"
    with tarfile.open(bundle.tar_path) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name == MANIFEST:
                data = json.dumps(json.loads(data), indent=4).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(BundleError, match="signature"):
        extract_bundle(out, tmp_path / "out", bundle.public_key)
