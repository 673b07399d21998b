"""Offsite-Tuning quality: how much of the adapter's gain survives the emulator, and how
much the emulator protects against data owners who hold its weights.

    python -m bench.offsite_quality [--quick] [--model M] [--configs A,B] [--seeds 0,1,2] --json OUT

Data: python-reference (train shard; held-out topics), 256-token blocks, AdamW. Two held-out
sets: `own_domain` (the first --heldout-blocks held-out python-reference blocks) and
`general` (as many blocks of general English from Debian's `fortunes` package, spread over
it: bench/general_text.py; `apt-get install fortunes`).
Rows, each as perplexity on both sets:

- full_zero_shot: the unmodified model.
- adapter_ceiling: the adapter blocks (first 2 + last 2) trained directly on the full model.
- full_finetuned (--full-ft): every block trained, same data and steps.
- for each emulator configuration (bench/emulator_configs.py): the emulator alone, and the
  emulator after each of three data owners trained it (bench/protection.py): `recipe`
  (adapter only; its adapter plugged into the full model is the product: `plugin`),
  `recalibrated` (adapter + every norm + a logit temperature) and `full_finetune` (every
  weight of the dequantized emulator). Same data, steps, lr and batch order for all.

`plugin_share` is the plug-in's share of the ceiling's log-perplexity gain on own-domain
text; protection against an owner on a set is that owner's emulator ppl / the plug-in's ppl
there (`protection`, `protection_recalibrated`, `protection_full_finetune`; `*_general` on
general text). `--seeds` repeats the ceiling and the `--seeded` configurations (default:
the named one) and reports mean and sample sd. Summary keys describe `--named` (default
`NAMED` in bench/emulator_configs.py). `--frontier PATH` writes the buildable rows as the
privacy-utility dial's data (emulators/frontier.py).

The 16 rows charted first (docs/benchmarks.md) used 30 steps x batch 4 at lr 2e-4 on 32
held-out blocks, recipe owner only. The three-owner table used `--steps 12 --batch-size 2
--lr 5e-4 --heldout-blocks 12` (the same Adam step budget, 1/5 of the tokens), because the
shared 2-core machine ran at load 15-30 while it was measured.

Every part (each owner of each configuration and seed, each baseline) is cached in
--cache-dir under a hash of (model digest, protocol, held-out sets, configuration), so an
interrupted run resumes, `--rows-only` runs configurations in parallel processes, and a new
configuration costs only itself; `--fresh` ignores the cache.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import typer

from bench.emulator_configs import (  # noqa: F401  (re-exported: older callers import them from here)
    FULL_CONFIGS,
    NAMED,
    PENDING_CONFIGS,
    QUICK_CONFIGS,
    EmulatorConfig,
    bits_of,
    build_emulator,
    emulator_bytes,
)
from bench.common import Protocol, corpus_blocks, set_threads
from bench.offsite_quality_measure import cache_path, cached_result, measure_baselines, measure_config
from bench.offsite_quality_report import config_row, mean_sd, merge_summary, print_table, write_frontier

app = typer.Typer(add_completion=False, help=__doc__)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise typer.BadParameter(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise typer.BadParameter("--seeds needs at least one seed, e.g. 0")
    return seeds


@app.command()
def main(
    json_out: Path = typer.Option(..., "--json", help="where to write the results JSON"),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="the quick configuration only, 12 steps, 12 held-out blocks (a smoke test, not a measurement)",
    ),
    model: str = typer.Option("smollm2-135m", "--model", help="model name or HF directory"),
    named: str = typer.Option(None, "--named", help="configuration whose numbers fill the summary keys"),
    configs: str = typer.Option(None, "--configs", help="comma-separated subset of configuration names to run"),
    seeds: str = typer.Option(
        "0", "--seeds", help="seeds for the ceiling and the --seeded configurations (mean and spread)"
    ),
    seeded: str = typer.Option(
        None,
        "--seeded",
        help="comma-separated configurations measured at every seed of --seeds (default: the named one)",
    ),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "offsite" / "bench-offsite-quality", "--cache-dir"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore cached rows and measure everything again"),
    threads: int = typer.Option(2, "--threads"),
    steps: int = typer.Option(30, "--steps", help="training steps of every data owner and of the ceiling"),
    batch_size: int = typer.Option(4, "--batch-size", help="blocks per training step"),
    lr: float = typer.Option(2e-4, "--lr", help="AdamW learning rate of every data owner and of the ceiling"),
    heldout_blocks: int = typer.Option(
        32, "--heldout-blocks", help="held-out blocks evaluated per set (0: all own-domain blocks)"
    ),
    full_ft: bool = typer.Option(
        False, "--full-ft/--no-full-ft", help="also measure the full model fine-tuned (reference row)"
    ),
    frontier: Path = typer.Option(
        None,
        "--frontier",
        help="also write these rows as the model's measured frontier into this JSON (the dial's data, e.g. emulators/frontier.json)",
    ),
    full_ft_owner_lr: float = typer.Option(
        None,
        "--full-ft-owner-lr",
        help="learning rate of the full-fine-tuning data owner (default: --lr; full fine-tuning wants a lower one)",
    ),
    cached_only: bool = typer.Option(
        False,
        "--cached-only",
        help="assemble the table from the cache only: unmeasured owners show as '-', rows without a plug-in are left out",
    ),
    rows_only: bool = typer.Option(
        False,
        "--rows-only",
        help="measure the configuration rows into the cache and stop (to run rows in parallel processes)",
    ),
    summary_into: Path = typer.Option(
        None,
        "--summary-into",
        help="also merge the named configuration's summary keys into this JSON, keeping its other keys "
        "(bench/results/offsite_quality.json keeps the 30 x 4 recipe chart)",
    ),
) -> None:
    """Example: python -m bench.offsite_quality --configs int3-awq,int4-awq --seeds 0,1,2 --json /tmp/q.json"""
    from bench.general_text import CORPUS_NAME, general_blocks
    from offsite.emulators.models import load_model

    set_threads(threads)
    proto = (
        Protocol(steps=12, lr=lr, full_lr=lr)
        if quick
        else Protocol(steps=steps, lr=lr, full_lr=lr, batch_size=batch_size)
    )
    seed_list = _seed_list(seeds)
    loaded = load_model(model)
    train, heldout = corpus_blocks(loaded, proto.block_size)
    n_eval = 12 if quick else heldout_blocks
    if n_eval:
        heldout = type(heldout)(heldout.input_ids[:n_eval], heldout.labels[:n_eval], heldout.attention_mask[:n_eval])
    sets = {"own_domain": heldout, "general": general_blocks(loaded.tokenizer, n_eval or 32, proto.block_size)}
    known = {c.name: c for c in FULL_CONFIGS + QUICK_CONFIGS + PENDING_CONFIGS}
    all_cfgs = QUICK_CONFIGS if quick else FULL_CONFIGS
    if configs:
        wanted = configs.split(",")
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise typer.BadParameter(f"unknown configuration(s) {unknown}; known: {sorted(known)}")
        all_cfgs = [known[w] for w in dict.fromkeys(wanted)]
    named = named or (all_cfgs[0].name if quick else NAMED)
    seeded_set = set(seeded.split(",")) if seeded else {named}
    cache = None if fresh else cache_dir
    t0 = time.perf_counter()

    def key_for(seed: int) -> dict:
        p = asdict(replace(proto, seed=seed))
        return {
            "model": loaded.digest,
            "protocol": p,
            "heldout": len(heldout),
            "train": len(train),
            "general": CORPUS_NAME,
        }

    if cached_only:
        seed_list = [s for s in seed_list if cache_path(cache_dir, "ceiling-v2", key_for(s)).exists()] or seed_list[:1]
    baselines = (
        {}
        if rows_only
        else {
            s: measure_baselines(
                loaded, train, sets, replace(proto, seed=s), cache, key_for(s), with_full=full_ft and s == 0
            )
            for s in seed_list
        }
    )
    results: dict[str, dict[int, dict]] = {}
    for cfg in all_cfgs:
        results[cfg.name] = {}
        for s in seed_list if cfg.name in seeded_set else [seed_list[0]]:
            payload = {**key_for(s), "emulator": cfg.key()}
            results[cfg.name][s] = measure_config(
                loaded,
                cfg,
                train,
                sets,
                replace(proto, seed=s),
                owner_lr={"full_finetune": full_ft_owner_lr} if full_ft_owner_lr else None,
                cached=lambda part, compute, payload=payload: cached_result(
                    cache, f"owner-{part}", payload, None if cached_only else compute
                ),
            )
    if rows_only:
        return
    full_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    zs = baselines[seed_list[0]]["full_zero_shot"]["ppl_by_set"]
    ceilings = {s: baselines[s]["adapter_ceiling"]["ppl_by_set"] for s in seed_list}
    all_cfgs = [cfg for cfg in all_cfgs if any("plugin" in r for r in results[cfg.name].values())]
    rows = [config_row(cfg, results[cfg.name], ceilings, zs, full_bytes) for cfg in all_cfgs]
    base0 = baselines[seed_list[0]]
    table = print_table(rows, base0)
    nrow = next((r for r in rows if r["config"] == named), rows[0])
    nres = results[nrow["config"]][seed_list[0]]
    ceil_sd = mean_sd([ceilings[s]["own_domain"] for s in seed_list])
    out = {
        "full_finetuned": None,  # replaced when measured (--full-ft)
        **base0,
        "adapter_ceiling_seeds": {
            "seeds": seed_list,
            "ppl_mean": ceil_sd[0],
            "ppl_sd": ceil_sd[1],
            "ppl_by_seed": {str(s): ceilings[s] for s in seed_list},
        },
        "emulator_zero_shot": {"ppl": nres["emulator_zero_shot"]["own_domain"]},
        "emulator_finetuned": {"ppl": nrow["emulator_finetuned_ppl"]},
        "plugin": {"ppl": nrow["plugin_ppl"]},
        "named_config": nrow["config"],
        "plugin_share": nrow["plugin_share"],
        "protection": nrow["protection"],
        "protection_recalibrated": nrow["protection_recalibrated"],
        "protection_full_finetune": nrow["protection_full_finetune"],
        "protection_general": nrow["protection_general"],
        "protection_recalibrated_general": nrow["protection_recalibrated_general"],
        "protection_full_finetune_general": nrow["protection_full_finetune_general"],
        "seeds": nrow["seeds"],
        "plugin_share_sd": nrow["plugin_share_sd"],
        "protection_full_finetune_sd": nrow["protection_full_finetune_sd"],
        "protection_full_finetune_general_sd": nrow["protection_full_finetune_general_sd"],
        "heldout_sets": {
            "own_domain": f"python-reference held-out topics, first {len(heldout)} blocks",
            "general": f"{CORPUS_NAME}, {len(sets['general'])} blocks spread over the corpus",
        },
        "data_owners": {
            "recipe": "adapter blocks only",
            "recalibrated": "adapter + every norm gain + a logit temperature",
            "full_finetune": "every parameter of the dequantized emulator",
        },
        "owner_lr": {"recipe": proto.lr, "recalibrated": proto.lr, "full_finetune": full_ft_owner_lr or proto.lr},
        "bundle_bytes": nrow["emulator_bytes"],
        "bundle_bytes_source": "in-memory emulator state (packed middle)",
        "full_model_bytes": full_bytes,
        "build_seconds": nrow["build_seconds"],
        "protocol": asdict(proto),
        "train_blocks": len(train),
        "heldout_blocks": len(heldout),
        "tradeoff": rows,
        "table_markdown": table,
        "load_average": os.getloadavg(),
        "wall_seconds": time.perf_counter() - t0,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(out, indent=1))
    print(f"wrote {json_out}")
    command = " ".join(["python -m bench.offsite_quality", *sys.argv[1:]])
    if summary_into:
        merge_summary(summary_into, out, json_out, command)
        print(f"merged the summary of {nrow['config']} into {summary_into}")
    if frontier:
        write_frontier(frontier, model, all_cfgs, rows, out, command)
        print(f"wrote the frontier of {model} into {frontier}")


if __name__ == "__main__":
    app()
