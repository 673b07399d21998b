"""bench.client_train's result derivation and table: ratios to the baselines and the issue's targets.

`derive` reads the per-mode records of one run (`result["modes"]`) and adds the ratios
(offsite_sparse against full fine-tuning, LoRA and the full adapter) and the target checks;
`table` prints the modes side by side; `code_commit` names the code a run measured. Speed is read in tokens per CPU-second when both
full fine-tuning and offsite_sparse have it (contention on a shared machine does not
distort it), else in tokens/s.
"""

from __future__ import annotations

import subprocess

MODES = ("full_ft", "lora_full", "offsite_full_adapter", "offsite_sparse")


def table(result: dict) -> str:
    rows = [
        "| mode | peak RSS MB | above runtime floor MB | tokens/s | tokens per CPU-s | loss first -> last | "
        "trainable params | FLOP/s vs fp32 GEMM | load avg | scheme |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = result["modes"].get(mode)
        if not r:
            continue
        rows.append(
            f"| {mode} | {r['peak_rss_mb']:.0f} | {r['peak_above_floor_mb']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{r.get('tokens_per_cpu_s') or float('nan'):.0f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
            f"{r['trainable_params']:,} | {r['flops_fraction_of_fp32_gemm']:.2f} | "
            f"{r['load_average_1min_start']:.1f}-{r['load_average_1min']:.1f} | {r['scheme']} |"
        )
    return "\n".join(rows)


def _fall(r: dict) -> float:
    """How far the loss fell: first step's loss minus the mean of the last three."""
    tail = r["losses"][-3:]
    return r["loss_first"] - sum(tail) / len(tail)


def derive(result: dict) -> None:
    """Ratios and target checks from `result["modes"]` (in place)."""
    modes = result["modes"]
    full, lora, sparse, adapter = (
        modes.get(m) for m in ("full_ft", "lora_full", "offsite_sparse", "offsite_full_adapter")
    )
    if full and sparse:
        result["ratios"] = {
            "sparse_rss_vs_full": sparse["peak_rss_mb"] / full["peak_rss_mb"],
            "sparse_speedup_vs_full": sparse["tokens_per_s"] / full["tokens_per_s"],
            "sparse_above_floor_vs_full": sparse["peak_above_floor_mb"] / full["peak_above_floor_mb"],
        }
        if sparse.get("tokens_per_cpu_s") and full.get("tokens_per_cpu_s"):
            result["ratios"]["sparse_cpu_speedup_vs_full"] = sparse["tokens_per_cpu_s"] / full["tokens_per_cpu_s"]
        if lora:
            result["ratios"]["sparse_rss_vs_lora"] = sparse["peak_rss_mb"] / lora["peak_rss_mb"]
            result["ratios"]["sparse_above_floor_vs_lora"] = sparse["peak_above_floor_mb"] / lora["peak_above_floor_mb"]
        if adapter:
            result["ratios"]["sparse_loss_fall_vs_full_adapter"] = (
                _fall(sparse) / _fall(adapter) if _fall(adapter) > 0 else None
            )
        speed = result["ratios"].get("sparse_cpu_speedup_vs_full") or result["ratios"]["sparse_speedup_vs_full"]
        fall = result["ratios"].get("sparse_loss_fall_vs_full_adapter")
        result["targets"] = {
            "rss_at_most_1/8_of_full_ft": result["ratios"]["sparse_rss_vs_full"] <= 1 / 8,
            "rss_at_most_1/3_of_lora_full": bool(lora) and result["ratios"]["sparse_rss_vs_lora"] <= 1 / 3,
            "speed_at_least_6.5x_full_ft": speed >= 6.5,
            "speed_read_as": "tokens per CPU-second"
            if "sparse_cpu_speedup_vs_full" in result["ratios"]
            else "tokens/s",
            "loss_fall_at_least_1/3_of_full_adapter": fall is not None and fall >= 1 / 3,
        }


def code_commit() -> str | None:
    """The checkout's commit, "+dirty" when the code measured here differs from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno", "--", "client", "emulators", "bench/client_train.py"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
