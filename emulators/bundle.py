"""The emulator bundle: what the model owner ships to data owners. One import for:

- `bundle_format`: the layout (manifest.json, manifest.sig, emulator.safetensors,
  adapter.safetensors, config.json, tokenizer files) and its fail-closed verification,
  for directories and tars (a tar's signature is checked before anything is unpacked);
- `bundle_write`: writing and signing a bundle (the model owner);
- `bundle_load`: loading a verified bundle into a trainable model (data owners);
- `vocab_codec`: how the embedding / LM-head matrices are stored.
"""

from __future__ import annotations

from .bundle_format import (
    ADAPTER_WEIGHTS,
    BUNDLE_FORMAT,
    CONFIG,
    EMULATOR_WEIGHTS,
    MANIFEST,
    SCALE_SUFFIX,
    SIGNATURE,
    BundleError,
    adapter_param_names,
    bundle_summary,
    extract_bundle,
    read_bundle_files,
    read_manifest_unverified,
    sha256_bytes,
    verify_bundle,
)
from .bundle_load import RUNTIMES, EmulatorBundle, load_bundle
from .bundle_write import ADAPTER_DTYPES, round_adapter, write_bundle
from .vocab_codec import EMBEDDING_STORAGE, decode_vocab_matrices, encode_vocab_matrices, int8_rows

__all__ = [
    "ADAPTER_DTYPES",
    "ADAPTER_WEIGHTS",
    "BUNDLE_FORMAT",
    "CONFIG",
    "EMBEDDING_STORAGE",
    "EMULATOR_WEIGHTS",
    "MANIFEST",
    "RUNTIMES",
    "SCALE_SUFFIX",
    "SIGNATURE",
    "BundleError",
    "EmulatorBundle",
    "adapter_param_names",
    "bundle_summary",
    "decode_vocab_matrices",
    "encode_vocab_matrices",
    "extract_bundle",
    "int8_rows",
    "load_bundle",
    "read_bundle_files",
    "read_manifest_unverified",
    "round_adapter",
    "sha256_bytes",
    "verify_bundle",
    "write_bundle",
]
