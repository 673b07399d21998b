"""The emulator the benches call shipped (`bench.client_train.shipped_emulator`) is the measured
frontier's named point (emulators/frontier.json): the same name and the same lossy options.

`shipped_emulator()` builds its BuildConfig from the demo's defaults and its name by hand; the
frontier holds both for the named point. Either side can move on its own (a new named point, a
lossy option the demo does not carry, a name spelled differently), and then the benches would
measure, and label, a bundle that is not the one the dial and `emulator inspect` describe.
"""

from __future__ import annotations

from bench.client_train import shipped_emulator
from offsite.emulators.build import BuildConfig
from offsite.emulators.frontier import PROTECTION_KEYS, load_frontier, match


def test_shipped_emulator_is_named_as_the_frontiers_named_point():
    name, shipped = shipped_emulator()
    frontier = load_frontier(shipped.model)
    assert frontier.named and name == frontier.named


def test_shipped_emulator_builds_the_frontiers_named_point():
    name, shipped = shipped_emulator()
    frontier = load_frontier(shipped.model)
    # every lossy option the named point sets, with the value it sets ...
    named = frontier.named_build_options()
    assert {k: getattr(shipped, k) for k in named} == named
    # ... and every other lossy option at BuildConfig's default, as the frontier measured it
    defaults = BuildConfig()
    rest = [k for k in PROTECTION_KEYS if k not in named]
    assert {k: getattr(shipped, k) for k in rest} == {k: getattr(defaults, k) for k in rest}
    # the dial's own matching (what `emulator inspect` shows for a bundle) finds the same point
    point = match(frontier, shipped.to_dict())
    assert point is not None and point.config == frontier.named == name
