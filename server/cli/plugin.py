"""`offsite-admin plugin`: put a trained adapter into the full model."""

from __future__ import annotations


def plugin() -> None:
    """Plug an adapter into the full model (not built yet)."""
    raise SystemExit("offsite-admin plugin: not implemented yet")
