"""The federation bench builds exactly the emulator we ship (the one `make demo` builds)."""

from __future__ import annotations


def test_the_federation_bench_builds_the_shipped_emulator():
    from bench.client_train import shipped_emulator
    from bench.federation import shipped_build
    from offsite.emulators.build import BuildConfig

    name, shipped = shipped_emulator()
    bench_name, build = shipped_build()
    assert bench_name == name
    assert BuildConfig(model=shipped.model, **build) == shipped
    assert build["prune_fraction"] == shipped.prune_fraction
