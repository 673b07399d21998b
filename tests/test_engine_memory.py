"""The engine's allocator policy: applied on glibc, never over an explicit environment setting."""

from __future__ import annotations

import sys

import pytest

from offsite.client.engine.memory import set_malloc_policy


def test_an_explicit_environment_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert set_malloc_policy() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_the_policy_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert set_malloc_policy() is True
