"""The reliability campaign (issue 16): every test here injects a real fault or bad input.

`pytest -m reliability` (or `make reliability`) runs it alone.
"""

from __future__ import annotations

import pathlib

import pytest

_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)
