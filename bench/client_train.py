"""Client training cost: full fine-tuning vs LoRA vs the Offsite engine, on the default model.

    python -m bench.client_train [--quick] --json bench/results/client_train.json

The emulator is the shipped default (`shipped_emulator()`: the configuration `make demo`
builds, named as in bench/results/offsite_quality.json), unless --quantize is given.
Same data (python-reference, the engine's own split and batch order for every mode), same
number of steps, sequence 256, batch 4, --threads threads (2 by default; on a shared
machine use 1 and read tokens per CPU-second, which contention does not distort). Each mode runs in its own process and
reports that process's peak RSS (VmHWM; also the peak while loading, and the peak of the
training phase alone, VmHWM reset after loading):

- full_ft: the full model, every parameter, plain PyTorch (HF forward with labels, AdamW).
- lora_full: peft LoRA r=8 on every linear of the full model (a FlowerTune-style client).
- offsite_full_adapter: the engine on the emulator bundle, all 4 adapter blocks train.
- offsite_sparse: the engine on the same bundle under --budget-mb (contribution analysis,
  with the top adapter block in full whenever it fits; default "auto": the minimum measured
  on this machine at run time plus a margin, so the documented command never trips "below
  the minimum" on a machine with a larger runtime).
  --lowbit-kernel (auto | int8 | dequant) picks the frozen middle's kernel: "auto" runs int8
  (its rows replace the packed codes) under the auto budget or none, and in the room a budget
  in MB leaves; "int8" everywhere; "dequant" rebuilds each weight every pass (no int8 rows).

The offsite modes load the bundle the way `offsite-client train` does: the lean runtime
(no transformers model classes) with the vocabulary decoded into the compute dtype. The
FLOP count of the offsite modes runs after their training peak is read (the counter
imports sympy, which no real client pays for).

The machine's fp32 (and bf16) GEMM GFLOP/s is measured in the same run; each mode's
achieved matmul FLOP/s (FlopCounterMode over one forward+backward, times steps, over the
training time) is reported as a fraction of the fp32 figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.client_train_report import MODES, code_commit, derive, table

THREADS = 2
QUALITY_JSON = Path(__file__).parent / "results" / "offsite_quality.json"


def _threads(n: int = THREADS) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shipped_emulator():
    """(name, BuildConfig) of the emulator `make demo` builds by default: the one we ship.

    One source of truth: the demo's own defaults, built the way the demo builds them. The
    name follows bench/results/offsite_quality.json's row names (e.g. "int4-awq-prune10")."""
    from offsite.emulators.build import BuildConfig
    from offsite.server.cli.demo import DemoConfig

    d = DemoConfig()
    cfg = BuildConfig(
        model=d.model,
        adapter_layers=tuple(d.adapter_layers),
        emulator_layers=d.emulator_layers,
        distill_steps=d.distill_steps,
        quantize=d.quantize,
        awq=d.awq,
        prune_fraction=d.prune_fraction,
        block_size=d.block_size,
        seed=d.seed,
    )
    name = (
        d.quantize + ("-awq" if d.awq else "") + (f"-prune{round(d.prune_fraction * 100)}" if d.prune_fraction else "")
    )
    if d.emulator_layers:
        name += f"-{d.emulator_layers}layers"
    if d.distill_steps:
        name += f"-distill{d.distill_steps}"
    return name, cfg


def quality_named_config() -> str | None:
    return json.loads(QUALITY_JSON.read_text()).get("named_config") if QUALITY_JSON.exists() else None


def gemm_gflops(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Best-of sustained GFLOP/s of an n x n x n matmul in this process."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


# --- workers (each in its own process) -------------------------------------------------


def _vmhwm_mb() -> float:
    from offsite.client.engine.memory import peak_rss_mb

    return peak_rss_mb()


def _data_and_cfg(tokenizer, args):
    from offsite.client.engine import TrainConfig
    from offsite.client.engine.trainer import prepare_data
    from offsite.emulators.data import python_reference_split

    examples = python_reference_split(n_shards=1).shards[0]
    cfg = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=4,
        block_size=256,
        seed=0,
        eval_batches=2,
        count_flops=True,
        warmup_steps=1,
    )
    return examples, cfg, prepare_data(examples, tokenizer, cfg)


def _plain_worker(mode: str, args) -> dict:
    """full_ft / lora_full: plain PyTorch on the full fp32 model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from offsite.client.engine.memory import FAST_MMAP_THRESHOLD_BYTES, reset_peak_rss, set_malloc_policy
    from offsite.client.engine.trainer import micro_batches
    from offsite.emulators.models import load_model

    set_malloc_policy(FAST_MMAP_THRESHOLD_BYTES)  # the engine's fast-mode allocator rules (see _run_child)
    lm = load_model("smollm2-135m")
    model = lm.model
    examples, cfg, data = _data_and_cfg(lm.tokenizer, args)
    if mode == "lora_full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )
    else:
        model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    load_peak = _vmhwm_mb()
    reset = reset_peak_rss()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def step(ids, labels, mask):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        return float(out.loss.detach())

    batches = list(micro_batches(data.train, cfg.batch_size, cfg.seed, 0, cfg.steps))
    counter = FlopCounterMode(display=False)
    with counter:
        step(*batches[0])
    opt.zero_grad(set_to_none=True)
    losses, tokens, seconds, cpu = [], 0, 0.0, 0.0
    for ids, labels, mask in batches:
        t, c = time.perf_counter(), time.process_time()
        losses.append(step(ids, labels, mask))
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
        tokens += int(mask.sum())
    train_peak = _vmhwm_mb()
    return {
        "peak_rss_mb": max(load_peak, train_peak),
        "load_peak_rss_mb": load_peak,
        "train_peak_rss_mb": train_peak if reset else None,
        "tokens_per_s": tokens / seconds,
        "train_cpu_seconds": cpu,
        "tokens_per_cpu_s": tokens / cpu,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
        "train_seconds": seconds,
        "tokens": tokens,
        "flops_per_step": int(counter.get_total_flops()),
        "scheme": "all parameters" if mode == "full_ft" else "peft LoRA r=8, all linears",
        "precision": "float32",
    }


def _offsite_worker(mode: str, args) -> dict:
    import torch

    from offsite.client.engine import TrainConfig, train_adapter
    from offsite.client.engine.memory import reset_peak_rss
    from offsite.emulators.bundle import load_bundle

    from offsite.client.engine.pruning import resolve_precision

    # what `offsite-client train` does: the lean runtime, the vocabulary in the compute dtype
    dtype = resolve_precision("auto", torch.device("cpu"))
    bundle = load_bundle(args.bundle, args.public_key, runtime="auto", vocab_dtype=dtype)
    examples, cfg, _ = _data_and_cfg(bundle.tokenizer, args)
    load_peak = _vmhwm_mb()
    reset = reset_peak_rss()
    # as `offsite-client train` does: the tokenizer goes once the data is tokenized
    cfg = TrainConfig(**{**cfg.__dict__, "release_tokenizer": True})
    cfg = TrainConfig(**{**cfg.__dict__, "lowbit_kernel": args.lowbit_kernel})
    if mode == "offsite_sparse":
        budget = args.budget_mb if args.budget_mb == "auto" else float(args.budget_mb)
        cfg = TrainConfig(**{**cfg.__dict__, "memory_budget_mb": budget, "probe_steps": 2})
    else:
        cfg = TrainConfig(**{**cfg.__dict__, "scheme": "full"})
    result = train_adapter(bundle, examples, cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
    m = result.metrics
    train_peak = m["peak_rss_mb"]  # read before the FLOP count, which is the benchmark's, not the client's
    keep = (
        "tokens_per_s",
        "tokens_per_cpu_s",
        "train_cpu_seconds",
        "loss_first",
        "loss_last",
        "losses",
        "trainable_params",
        "train_seconds",
        "tokens",
        "flops_per_step",
        "scheme",
        "precision",
        "eval_ppl_before",
        "eval_ppl_after",
        "lowest_trainable_block",
        "lowbit_int8_layers",
        "lowbit_layers",
        "lowbit_int8_cache_mb",
        "fast_mode",
    )
    out = {k: m[k] for k in keep}
    out.update(
        peak_rss_mb=max(load_peak, train_peak),
        load_peak_rss_mb=load_peak,
        vmhwm_after_flop_count_mb=_vmhwm_mb(),
        train_peak_rss_mb=train_peak if reset else None,
        bundle=bundle.manifest.get("build", {}).get("config"),
    )
    if "budget" in m:
        out["budget"] = {k: m["budget"][k] for k in ("budget_mb", "estimate_mb", "minimum_mb", "probe_seconds", "spec")}
    return out


def worker(mode: str, args) -> None:
    _threads(args.threads)
    from offsite.client.engine.memory import current_rss_mb

    # the runtime floor: what the mode's process imports before it loads a weight
    if mode in ("full_ft", "lora_full"):
        from transformers import AutoModelForCausalLM  # noqa: F401

        from offsite.emulators import models  # noqa: F401
    else:
        from offsite.client import engine  # noqa: F401
        from offsite.emulators import bundle  # noqa: F401
    floor = current_rss_mb()
    result = _plain_worker(mode, args) if mode in ("full_ft", "lora_full") else _offsite_worker(mode, args)
    result["runtime_floor_rss_mb"] = floor
    result["peak_above_floor_mb"] = result["peak_rss_mb"] - floor
    Path(args.worker_out).write_text(json.dumps(result))


def build_config(args):
    """(name, BuildConfig): the shipped default, or --quantize/--emulator-layers when given."""
    from offsite.emulators.build import BuildConfig

    if args.quantize is None:
        return shipped_emulator()
    name = args.quantize + (f"-{args.emulator_layers}layers" if args.emulator_layers else "")
    return name, BuildConfig(quantize=args.quantize, emulator_layers=args.emulator_layers)


def build_worker(args) -> None:
    _threads(args.threads)
    from offsite.emulators.build import build_bundle
    from offsite.emulators.signing import generate_signing_key

    key, pub = generate_signing_key(Path(args.bundle).parent / "keys", force=True)
    build_bundle(build_config(args)[1], key, args.bundle, progress=False, overwrite=True)


def gemm_worker(args) -> None:
    _threads(args.threads)
    Path(args.worker_out).write_text(json.dumps({"fp32": gemm_gflops("float32"), "bf16": gemm_gflops("bfloat16")}))


# --- orchestration -----------------------------------------------------------------


def _run_child(extra: list[str], out: Path, timeout: float) -> dict:
    # No MALLOC_MMAP_THRESHOLD_ here: the engine sets its own allocator policy (1 MiB lean,
    # 4 MiB with the int8 cache: memory.set_malloc_policy) and the baselines set the engine's
    # fast one in _plain_worker, so glibc's dynamic threshold flatters or hurts no mode.
    env = {
        **{k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"},
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "bench.client_train", *extra, "--worker-out", str(out)]
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    sys.stderr.write(
        "".join(line + "\n" for line in proc.stderr.splitlines() if not line.startswith("Loading weights"))
    )
    return json.loads(out.read_text()) if out.exists() else {}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.client_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps per mode (a smoke run)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--steps", type=int, default=None, help="training steps per mode (default 6; 3 with --quick)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--budget-mb", default="auto", help="memory budget of offsite_sparse: auto (default) or MB")
    p.add_argument(
        "--lowbit-kernel",
        default="auto",
        choices=("auto", "int8", "dequant"),
        help="the frozen low-bit middle's kernel (auto: int8 with the auto budget or none, else where a budget leaves room)",
    )
    p.add_argument(
        "--quantize", default=None, help="middle blocks of the emulator (default: the shipped configuration)"
    )
    p.add_argument("--emulator-layers", type=int, default=None, help="middle blocks kept (with --quantize)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads per mode (1 on a shared machine)")
    p.add_argument(
        "--parallel",
        action="store_true",
        help="run the modes side by side (on a shared machine: read tokens per CPU-second at --threads 1)",
    )
    # the engine's modes first: they are quick, and a budget below the minimum shows at once
    p.add_argument("--modes", default=",".join(reversed(MODES)))
    p.add_argument(
        "--merge",
        action="store_true",
        help="update the modes run here inside an existing --json file (noted under 'reruns')",
    )
    p.add_argument("--bundle", default=None, help="reuse this bundle of the same configuration instead of building one")
    p.add_argument("--public-key", default=None, help="its signing.pub (with --bundle)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 6)
    if args.worker == "build":
        return build_worker(args)
    if args.worker == "gemm":
        return gemm_worker(args)
    if args.worker:
        return worker(args.worker, args)

    started = time.time()
    config_name, build_cfg = build_config(args)
    with tempfile.TemporaryDirectory(prefix="bench-client-train-") as tmp:
        tmp = Path(tmp)
        bundle, pub = (
            (Path(args.bundle), Path(args.public_key))
            if args.bundle
            else (tmp / "bundle", tmp / "keys" / "signing.pub")
        )
        common = [
            "--steps",
            str(args.steps),
            "--lr",
            str(args.lr),
            "--budget-mb",
            str(args.budget_mb),
            "--bundle",
            str(bundle),
            "--public-key",
            str(pub),
            "--threads",
            str(args.threads),
            "--lowbit-kernel",
            args.lowbit_kernel,
        ]
        if args.quantize:
            common += ["--quantize", args.quantize] + (
                ["--emulator-layers", str(args.emulator_layers)] if args.emulator_layers else []
            )
        if not args.bundle:
            print(f"building the {config_name} emulator bundle ...", file=sys.stderr)
            _run_child(["--worker", "build", *common], tmp / "build.json", 1800)
        gemm = _run_child(["--worker", "gemm", "--threads", str(args.threads)], tmp / "gemm.json", 300)
        modes, failed = {}, {}

        def run_mode(mode: str) -> None:
            print(f"running {mode} ({args.steps} steps) ...", file=sys.stderr)
            load_start = os.getloadavg()[0]
            try:
                r = _run_child(["--worker", mode, *common], tmp / f"{mode}.json", 3600)
            except RuntimeError as e:  # e.g. killed for memory: keep the other modes' results
                failed[mode] = str(e)[-2000:]
                print(f"  {mode} FAILED: {str(e)[-300:]}", file=sys.stderr)
                return
            r["flops_fraction_of_fp32_gemm"] = (
                r["flops_per_step"] * args.steps / r["train_seconds"] / 1e9 / gemm["fp32"]
            )
            r["gemm_gflops_same_run"] = gemm
            r["load_average_1min_start"], r["load_average_1min"] = load_start, os.getloadavg()[0]
            modes[mode] = r
            print(
                f"  {mode}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['tokens_per_s']:.0f} tokens/s, loss "
                f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
                file=sys.stderr,
            )

        if args.parallel:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(args.modes.split(","))) as pool:
                list(pool.map(run_mode, args.modes.split(",")))
        else:
            for mode in args.modes.split(","):
                run_mode(mode)
    reruns = {}
    if args.merge and args.json and args.json.exists():
        previous = json.loads(args.json.read_text())
        reruns = previous.get("reruns", {})
        for mode in modes:
            reruns[mode] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        modes = {**previous["modes"], **modes}
    result = {
        "benchmark": "client_train",
        "reruns": reruns,
        "quick": args.quick,
        "steps": args.steps,
        "lr": args.lr,
        "sequence": 256,
        "batch": 4,
        "threads": args.threads,
        "parallel": args.parallel,
        "model": "smollm2-135m",
        "emulator_config": config_name,
        "quality_named_config": quality_named_config(),
        "build_config": build_cfg.to_dict(),
        "budget": args.budget_mb,
        "lowbit_kernel": args.lowbit_kernel,
        "gemm_gflops": gemm,
        "modes": modes,
        "failed": failed,
        "seconds": round(time.time() - started, 1),
        "load_average_at_end": os.getloadavg()[0],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m bench.client_train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": code_commit(),
    }
    derive(result)
    text = table(result)
    print(text)
    if "ratios" in result:
        print(json.dumps({"ratios": result["ratios"], "targets": result["targets"]}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
