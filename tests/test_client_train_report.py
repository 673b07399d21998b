"""bench.client_train_report: the ratios and target checks a client_train run is judged by."""

from __future__ import annotations

from bench.client_train_report import derive, table


def _mode(rss: float, cpu_speed: float, losses: list[float], floor: float = 200.0) -> dict:
    return {
        "peak_rss_mb": rss,
        "peak_above_floor_mb": rss - floor,
        "tokens_per_s": cpu_speed / 2,
        "tokens_per_cpu_s": cpu_speed,
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_params": 10,
        "flops_fraction_of_fp32_gemm": 0.5,
        "load_average_1min_start": 1.0,
        "load_average_1min": 1.5,
        "scheme": "x",
    }


def _result(sparse_rss: float, sparse_speed: float, sparse_losses: list[float]) -> dict:
    return {
        "modes": {
            "full_ft": _mode(4000.0, 100.0, [3.0, 2.8, 2.6, 2.5]),
            "lora_full": _mode(3000.0, 120.0, [3.0, 2.9, 2.9, 2.9]),
            "offsite_full_adapter": _mode(1500.0, 200.0, [3.0, 2.9, 2.7, 2.5]),  # falls 3.0 - 2.7 = 0.3
            "offsite_sparse": _mode(sparse_rss, sparse_speed, sparse_losses),
        }
    }


def test_all_targets_met_read_per_cpu_second():
    r = _result(480.0, 700.0, [3.0, 2.95, 2.9, 2.85])  # falls 3.0 - 2.9 = 0.1: a third of 0.3
    derive(r)
    ratios, targets = r["ratios"], r["targets"]
    assert ratios["sparse_rss_vs_full"] == 480 / 4000
    assert ratios["sparse_rss_vs_lora"] == 480 / 3000
    assert ratios["sparse_cpu_speedup_vs_full"] == 7.0
    assert abs(ratios["sparse_loss_fall_vs_full_adapter"] - 1 / 3) < 1e-9
    assert targets["speed_read_as"] == "tokens per CPU-second"
    assert all(v for k, v in targets.items() if k != "speed_read_as")


def test_each_target_can_fail():
    r = _result(520.0, 640.0, [3.0, 3.0, 3.0, 2.95])
    derive(r)
    t = r["targets"]
    assert not t["rss_at_most_1/8_of_full_ft"]  # 0.13x
    assert t["rss_at_most_1/3_of_lora_full"]
    assert not t["speed_at_least_6.5x_full_ft"]  # 6.4x
    assert not t["loss_fall_at_least_1/3_of_full_adapter"]  # 0.0167 of 0.3


def test_no_ratios_without_both_full_ft_and_sparse_and_table_lists_modes_run():
    r = _result(480.0, 700.0, [3.0, 2.9, 2.9, 2.9])
    del r["modes"]["full_ft"]
    derive(r)
    assert "ratios" not in r and "targets" not in r
    rows = table(r).splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in rows[2:]] == [
        "lora_full",
        "offsite_full_adapter",
        "offsite_sparse",
    ]
