"""The emulator-quality bench's results: one row per configuration (seeds averaged), the
printed table, the named configuration's summary merged into an earlier results JSON, and
the buildable rows written as the privacy-utility dial's frontier (emulators/frontier.py).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from offsite.files import atomic_write

from bench.common import log_gain_share
from bench.emulator_configs import EmulatorConfig
from bench.protection import ATTACKERS


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def config_row(
    cfg: EmulatorConfig, per_seed: dict[int, dict], ceilings: dict[int, dict], zero_shot: dict, full_bytes: int
) -> dict:
    """One table row: per-seed values averaged (mean, and sample sd where seeds > 1)."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]

    def stat(f, need: str = "plugin"):
        xs = [f(per_seed[s], ceilings[s]) for s in seeds if need in per_seed[s]]
        return mean_sd(xs) if xs else (None, None)

    share = stat(lambda r, c: log_gain_share(zero_shot["own_domain"], c["own_domain"], r["plugin"]["own_domain"]))
    prot = {
        a: {st: stat(lambda r, c, a=a, st=st: r[a][st] / r["plugin"][st], need=a) for st in ("own_domain", "general")}
        for a in ATTACKERS
    }
    seeds = [s for s in seeds if "plugin" in per_seed[s]]
    plugin = stat(lambda r, c: r["plugin"]["own_domain"])[0]
    emu_ft = stat(lambda r, c: r["recipe"]["own_domain"])[0]
    ceil = stat(lambda r, c: c["own_domain"])[0]
    bits = sorted({b for b in ([cfg.bits] + list(cfg.block_bits.values()) + list(cfg.linear_bits.values())) if b})
    return {
        "config": cfg.name,
        "blocks_kept": len(first["kept"]),
        "weight_bits": "/".join(map(str, bits)) if bits else "fp32",
        "awq": cfg.awq,
        "vocab_matrix": f"int{cfg.embed_bits}-g{cfg.embed_group}" if cfg.embed_bits else "int8-row",
        "distill_steps": cfg.distill_steps,
        "selection": cfg.selection,
        "extra_step": cfg.extra_step,
        "seeds": seeds,
        "plugin_share": share[0],
        "plugin_share_sd": share[1],
        "emulator_zero_shot_ppl": first["emulator_zero_shot"]["own_domain"],
        "emulator_finetuned_ppl": emu_ft,
        "plugin_ppl": plugin,
        "protection": prot["recipe"]["own_domain"][0],
        "protection_sd": prot["recipe"]["own_domain"][1],
        "protection_recalibrated": prot["recalibrated"]["own_domain"][0],
        "protection_full_finetune": prot["full_finetune"]["own_domain"][0],
        "protection_full_finetune_sd": prot["full_finetune"]["own_domain"][1],
        "protection_general": prot["recipe"]["general"][0],
        "protection_recalibrated_general": prot["recalibrated"]["general"][0],
        "protection_full_finetune_general": prot["full_finetune"]["general"][0],
        "protection_full_finetune_general_sd": prot["full_finetune"]["general"][1],
        "ppl_by_owner": {k: first.get(k) for k in ("emulator_zero_shot", "plugin", *ATTACKERS)},
        "protection_per_lost_gain": (math.log(emu_ft / plugin) / math.log(plugin / ceil) if plugin > ceil else None),
        "emulator_bytes": first.get("emulator_bytes"),
        "bytes_vs_full": first["emulator_bytes"] / full_bytes if first.get("emulator_bytes") else None,
        "build_seconds": first.get("build_seconds"),
    }


def _pm(mean: float | None, sd: float | None, seeds: int, fmt: str) -> str:
    if mean is None:
        return "-"
    return fmt.format(mean) + (" ± " + fmt.format(sd) if seeds > 1 else "")


def print_table(rows: list[dict], baselines: dict) -> str:
    lines = [
        "| config | step | bits | plug-in share | protection: recipe (own / general) | adapter+norms+temperature (own / general) | full fine-tune (own / general) | plug-in ppl | bundle MB | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = len(r["seeds"])
        lines.append(
            f"| {r['config']} | {r['extra_step'] or '-'} | {r['weight_bits']}{' awq' if r['awq'] else ''} | "
            f"{_pm(100 * r['plugin_share'], 100 * r['plugin_share_sd'], n, '{:.0f}%')} | "
            f"{_pm(r['protection'], r['protection_sd'], n, '{:.2f}x')} / {_pm(r['protection_general'], 0, 1, '{:.2f}x')} | "
            f"{_pm(r['protection_recalibrated'], 0, 1, '{:.2f}x')} / {_pm(r['protection_recalibrated_general'], 0, 1, '{:.2f}x')} | "
            f"{_pm(r['protection_full_finetune'], r['protection_full_finetune_sd'], n, '{:.2f}x')} / "
            f"{_pm(r['protection_full_finetune_general'], r['protection_full_finetune_general_sd'], n, '{:.2f}x')} | "
            f"{r['plugin_ppl']:.2f} | {_pm(r['emulator_bytes'] and r['emulator_bytes'] / 1e6, 0, 1, '{:.0f}')} | {','.join(map(str, r['seeds']))} |"
        )
    zs, ce = baselines["full_zero_shot"]["ppl_by_set"], baselines["adapter_ceiling"]["ppl_by_set"]
    head = (
        f"full zero-shot {zs['own_domain']:.2f} (general {zs['general']:.2f}), adapter ceiling "
        f"{ce['own_domain']:.2f} (general {ce['general']:.2f})"
        + (f", full fine-tune {baselines['full_finetuned']['ppl']:.2f}" if "full_finetuned" in baselines else "")
    )
    text = head + "\n\n" + "\n".join(lines)
    print(text)
    return text


SUMMARY_KEYS = (
    "named_config",
    "plugin_share",
    "plugin_share_sd",
    "protection",
    "protection_recalibrated",
    "protection_full_finetune",
    "protection_full_finetune_sd",
    "protection_general",
    "protection_recalibrated_general",
    "protection_full_finetune_general",
    "protection_full_finetune_general_sd",
    "seeds",
)


def merge_summary(path: Path, out: dict, results: Path, command: str) -> None:
    """Write the named configuration's summary keys into `path`, which keeps its other keys
    (the 30 x 4 recipe chart); `owners_protocol` says where these numbers come from."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({k: out[k] for k in SUMMARY_KEYS})
    data["owners_protocol"] = {
        "note": f"the summary keys come from the three-owner run ({results}); 'tradeoff' is the 30 x 4 recipe-only chart",
        "protocol": out["protocol"],
        "owner_lr": out["owner_lr"],
        "heldout_sets": out["heldout_sets"],
        "adapter_ceiling_seeds": out["adapter_ceiling_seeds"],
        "results": str(results),
        "command": command,
        "load_average": out["load_average"],
    }
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def write_frontier(
    path: Path, model: str, cfgs: list[EmulatorConfig], rows: list[dict], out: dict, command: str
) -> None:
    """Merge this run's buildable rows into the dial's JSON (emulators/frontier.py)."""
    from bench.emulator_configs import build_options
    from offsite.files import atomic_write

    data = json.loads(path.read_text()) if path.exists() else {"schema": 1, "models": {}}
    points = []
    for cfg, r in zip(cfgs, rows):
        opts = build_options(cfg)
        if opts is None or any(r[_prot_key(o, s)] is None for o in ATTACKERS for s in ("own_domain", "general")):
            continue  # a bench-only lever, or an owner not measured yet: the dial needs all three
        if r["plugin_share"] <= 0:
            continue  # the plug-in is worse than the untuned model: protection without a product
        points.append(
            {
                "config": cfg.name,
                "build": opts,
                "plugin_share": round(r["plugin_share"], 4),
                "seeds": r["seeds"],
                "protection": {
                    o: {s: round(r[_prot_key(o, s)], 4) for s in ("own_domain", "general")} for o in ATTACKERS
                },
            }
        )
    data["models"][model] = {
        "named": out["named_config"],
        "points": points,
        "measured": {
            "protocol": {**out["protocol"], "owner_lr": out["owner_lr"]},
            "own_domain": out["heldout_sets"]["own_domain"],
            "general": out["heldout_sets"]["general"],
            "own_domain_short": "python-reference held-out topics",
            "general_short": "Debian fortunes (general English)",
            "command": command,
            "load_average": out["load_average"],
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def _prot_key(owner: str, held_out: str) -> str:
    base = "protection" if owner == "recipe" else f"protection_{owner}"
    return base + ("_general" if held_out == "general" else "")
