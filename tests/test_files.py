"""offsite.files: directories swapped in whole, tars unpacked safely, JSONL errors with line numbers."""

from __future__ import annotations

import io
import tarfile
import threading

import pytest

from offsite import files
from offsite.files import JsonlError, UnsafeArchive, atomic_dir, extract_tar, read_jsonl

# --- atomic_dir ---------------------------------------------------------------------------------


def test_a_new_directory_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("a")
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("b")
        assert not out.exists()  # nothing at the final path while it is being built
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.txt").read_text() == "b"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "failed") as d:
        (d / "half.txt").write_text("x")
        raise RuntimeError("the build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind


def test_an_existing_directory_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), atomic_dir(out) as d:
        pytest.fail("the body must not run")
    with pytest.raises(ValueError), atomic_dir(out, overwrite=True) as d:
        (d / "new.txt").write_text("new")
        raise ValueError("failed half way")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out, overwrite=True) as d:
        (d / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone too


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_replacing_leaves_no_moment_without_a_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "v").write_text("0")
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not out.is_dir():
                missing.append(1)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(1, 60):
            with atomic_dir(out, overwrite=True) as d:
                (d / "v").write_text(str(i))
    finally:
        stop.set()
        t.join()
    assert (out / "v").read_text() == "59"
    if exchange:  # the fallback may show a gap; the exchange never does
        assert missing == []


# --- extract_tar ---------------------------------------------------------------------------------


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"abc"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_extract_tar_unpacks_regular_files(tmp_path):
    archive = _tar(tmp_path / "ok.tar", [_file("a.txt"), _file("d/b.txt", b"bb")])
    out = extract_tar(archive, tmp_path / "out", max_bytes=100)
    assert (out / "a.txt").read_bytes() == b"abc" and (out / "d" / "b.txt").read_bytes() == b"bb"


@pytest.mark.parametrize(
    "bad, why",
    [
        (_file("../escape.txt"), "outside"),
        (_file("/etc/x"), "outside"),
        ("link", "link or special"),
        (_file("big.bin", bytes(1000)), "more than the 100 allowed"),
    ],
)
def test_extract_tar_refuses_before_writing(tmp_path, bad, why):
    if bad == "link":
        bad = (tarfile.TarInfo("l"), None)
        bad[0].type, bad[0].linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar(tmp_path / "bad.tar", [_file("a.txt"), bad])
    with pytest.raises(UnsafeArchive, match=why):
        extract_tar(archive, tmp_path / "out", max_bytes=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]


def test_extract_tar_names_a_truncated_archive(tmp_path):
    archive = _tar(tmp_path / "ok.tar", [_file("a.bin", bytes(5000))])
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(UnsafeArchive, match="truncated"):
        extract_tar(archive, tmp_path / "out", max_bytes=10_000)
    assert not (tmp_path / "out").exists()


# --- read_jsonl ----------------------------------------------------------------------------------


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(read_jsonl(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:4", {"a": 2})]
    path.write_bytes(b'{"a": 1}\n{"a": \n')
    with pytest.raises(JsonlError, match=rf"{path.name}:2: invalid JSON"):
        list(read_jsonl(path))
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(JsonlError, match=r":2: not UTF-8"):
        list(read_jsonl(path))


def test_read_jsonl_takes_open_text_or_binary_files():
    assert list(read_jsonl(io.StringIO('{"x": 1}\n'), "stdin")) == [("stdin:1", {"x": 1})]
    assert [v for _, v in read_jsonl(io.BytesIO(b'[1]\n"s"\n'), "b")] == [[1], "s"]
