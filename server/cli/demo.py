"""`offsite-admin demo`: the end-to-end path on the default model."""

from __future__ import annotations


def demo() -> None:
    """Run the end-to-end demo (not built yet)."""
    raise SystemExit("offsite-admin demo: not implemented yet")
