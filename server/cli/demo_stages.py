"""The demo as one table of resumable stages (`STAGES`), run in order by `run_demo`.

Each stage reads what earlier stages left on the `DemoRun`, writes its files under the work
directory, and skips the expensive part when its output is already there and matches the
options, so an interrupted demo resumes where it stopped. The model owner's side and the
data owner's side run on one machine here; the stages name which party does what.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from offsite.cli import err_console


def _named_default() -> dict:
    # The shipped emulator is the measured frontier's named default (the best point at >= 1.3x
    # against the strongest data owner, emulators/frontier.json; docs/benchmarks.md, "Emulator
    # quality"), so the demo, the client benches and `--protection` all mean the same bundle.
    from offsite.emulators.frontier import default_build_options

    return default_build_options("smollm2-135m")


_NAMED = _named_default()
DEFAULT_QUANTIZE: str = _NAMED.get("quantize", "none")
DEFAULT_AWQ: bool = bool(_NAMED.get("awq", False))
DEFAULT_PRUNE: float = float(_NAMED.get("prune_fraction", 0.0))


@dataclass
class DemoConfig:
    model: str = "smollm2-135m"
    quantize: str = DEFAULT_QUANTIZE
    awq: bool = DEFAULT_AWQ
    prune_fraction: float = DEFAULT_PRUNE
    emulator_layers: int | None = None
    distill_steps: int = 0
    adapter_layers: tuple[int, int] = (2, 2)
    steps: int = 40
    lr: float = 1e-4
    rounds: int = 2  # federated rounds after the single-owner fine-tune (0: stop after plug-in)
    clients: int = 2
    local_steps: int = 10
    eval_limit: int = 0  # safety items per suite at the gate (0: every item; the policy blocks a capped run)
    gate_suites: tuple[str, ...] = ()  # suites or categories at the gate (empty: all)
    batch_size: int = 4
    block_size: int = 256
    eval_blocks: int = 32  # held-out blocks per evaluation (0: all)
    seed: int = 0
    export: bool = True


@dataclass
class DemoRun:
    """What the stages share: the work directory's layout and the results so far."""

    work_dir: Path
    cfg: DemoConfig
    out: Console = field(default_factory=lambda: err_console)  # the user's terminal (stderr)
    loaded: Any = None  # the full model (offsite.emulators.models.LoadedModel)
    manifest: dict | None = None
    bundle: Any = None  # the loaded EmulatorBundle
    train_examples: list | None = None
    heldout: Any = None
    ppl: dict[str, float] = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    federation: dict | None = None

    def __post_init__(self) -> None:
        w = self.work_dir
        self.keys_dir, self.bundle_dir, self.adapter = w / "keys", w / "bundle", w / "adapter.safetensors"
        self.key, self.pub = self.keys_dir / "signing.key", self.keys_dir / "signing.pub"
        self.candidate, self.fed_dir, self.gate_dir = w / "candidate", w / "federation", w / "gate"
        self.results, self.log = w / "demo-results.json", w / "demo.log"

    def say(self, message: str) -> None:
        self.out.print(message, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: float) -> Iterator[Callable[[float, str], None]]:
        """Yields update(completed, description): a bar on a terminal; in a log, a line each
        time the description's first word changes or every tenth of the way."""
        if self.out.is_terminal:
            with Progress(
                TextColumn("      {task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                console=self.out,
                transient=True,
            ) as bar:
                task = bar.add_task(description, total=total)
                yield lambda done, text: bar.update(task, completed=done, description=text[:60])
            return
        last = {"text": "", "tenth": -1}

        def update(done: float, text: str) -> None:
            tenth = int(10 * done / total) if total else 0
            if text.split(" ")[0] != last["text"].split(" ")[0] or tenth > last["tenth"]:
                self.say(f"      {text}")
                last.update(text=text, tenth=tenth)

        yield update

    def perplexity(self, model, what: str) -> float:
        from offsite.emulators.data import perplexity

        if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
            # QuantLinear unpacks its codes in every forward; plain Linears holding the same
            # dequantized values compute the same function, faster, for evaluation only.
            from offsite.emulators.quantize import dequantize_module

            model = copy.deepcopy(model)
            dequantize_module(model)
        value = perplexity(model, self.heldout, batch_size=self.cfg.batch_size)
        self.say(f"      {what}: held-out perplexity {value:.2f}")
        return value


@contextlib.contextmanager
def library_output_to(log_path: Path, run: DemoRun) -> Iterator[None]:
    """Send what libraries print while this runs (Ray's FutureWarning, Flower's INFO lines, the
    simulation workers' output) to `log_path`: Python's streams and Flower's log handlers for
    this process, the file descriptors for child processes. The demo's own lines still reach
    the user's terminal through `run.out`."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        real_stderr = sys.stderr.fileno() == 2
    except (AttributeError, ValueError, io.UnsupportedOperation):  # captured (tests): fds are not the user's
        real_stderr = False
    user = os.fdopen(os.dup(2), "w", buffering=1) if real_stderr else sys.stderr
    saved_fds, saved_streams, previous = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr), run.out
    originals = {id(sys.stdout): sys.stdout, id(sys.stderr): sys.stderr}
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        before = {
            h: h.stream
            for name, h in _stream_handlers()
            if id(h.stream) in originals or name.split(".")[0] in ("flwr", "ray")
        }
        for h in before:
            h.setStream(log)
        run.out = Console(file=user, force_terminal=previous.is_terminal)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved_streams
            for _, h in _stream_handlers():  # also those a library created meanwhile (Flower's, Ray's)
                if h.stream is log:
                    h.setStream(before.get(h, saved_streams[1]))
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            run.out = previous
            if real_stderr:
                user.close()


def _stream_handlers() -> list[tuple[str, logging.StreamHandler]]:
    loggers = [logging.getLogger()] + [
        v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)
    ]
    return [(lg.name, h) for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


# --- the stages ---------------------------------------------------------------------------


def stage_keys(run: DemoRun) -> str:
    from offsite.emulators.signing import generate_signing_key

    if run.key.exists() and run.pub.exists():
        return f"reusing {run.keys_dir}"
    generate_signing_key(run.keys_dir)
    return f"wrote {run.key} (mode 600) and {run.pub}"


def stage_bundle(run: DemoRun) -> str:
    from offsite.emulators.build import BuildConfig, build_bundle
    from offsite.emulators.bundle import BundleError, verify_bundle
    from offsite.emulators.models import load_model

    cfg = run.cfg
    run.loaded = load_model(cfg.model)
    build = BuildConfig(
        model=cfg.model,
        adapter_layers=tuple(cfg.adapter_layers),
        emulator_layers=cfg.emulator_layers,
        distill_steps=cfg.distill_steps,
        quantize=cfg.quantize,
        awq=cfg.awq,
        prune_fraction=cfg.prune_fraction,
        block_size=cfg.block_size,
        seed=cfg.seed,
    )
    if run.bundle_dir.exists():
        with contextlib.suppress(BundleError):
            manifest = verify_bundle(run.bundle_dir, run.pub)
            same = manifest.get("build", {}).get("config") == json.loads(json.dumps(build.to_dict()))
            if same and manifest["base_model"]["digest"] == run.loaded.digest:
                run.manifest = manifest
                return f"reusing {run.bundle_dir} (same configuration)"
    steps = f"{cfg.quantize}{' + AWQ' if cfg.awq else ''}{f' + {cfg.prune_fraction:.0%} pruned' if cfg.prune_fraction else ''}"
    with run.progress(f"{steps} emulator of {cfg.model}", 1.0) as update:
        run.manifest = build_bundle(
            build, run.key, run.bundle_dir, progress=False, overwrite=True, loaded=run.loaded, on_progress=update
        )
    return f"wrote {run.bundle_dir} ({_mb(run)} MB)"


def stage_verify(run: DemoRun) -> str:
    from offsite.emulators.bundle import load_bundle, verify_bundle
    from offsite.emulators.data import TokenBlocks, python_reference_split, tokenize_examples

    verify_bundle(run.bundle_dir, run.pub)
    run.bundle = load_bundle(run.bundle_dir, run.pub)
    split = python_reference_split(n_shards=1)
    run.train_examples = split.shards[0]
    heldout = tokenize_examples(split.heldout, run.loaded.tokenizer, run.cfg.block_size)
    n = run.cfg.eval_blocks
    if n and len(heldout) > n:
        heldout = TokenBlocks(heldout.input_ids[:n], heldout.labels[:n], heldout.attention_mask[:n])
    run.heldout = heldout
    return f"signature and {len(run.manifest['files'])} files OK; emulator loaded"


def stage_zero_shot(run: DemoRun) -> str:
    run.ppl["full_zero_shot"] = run.perplexity(run.loaded.model, "full model")
    run.ppl["emulator_zero_shot"] = run.perplexity(run.bundle.model, "emulator")
    return f"{run.heldout.n_loss_tokens} held-out tokens"


def stage_finetune(run: DemoRun) -> str:
    from offsite.client.engine import TrainConfig, train_adapter
    from offsite.emulators.adapter import load_adapter, save_adapter
    from offsite.emulators.bundle import load_bundle

    cfg = run.cfg
    if run.adapter.exists():
        state, meta = load_adapter(run.adapter)
        if (meta.get("bundle_manifest_sha256"), meta.get("demo_steps"), meta.get("demo_lr")) == (
            run.bundle.manifest_sha256,
            str(cfg.steps),
            str(cfg.lr),
        ):
            run.bundle.load_adapter_state(state)
            run.training = {"reused": True}
            run.ppl["emulator_finetuned"] = run.perplexity(run.bundle.model, "emulator + trained adapter")
            return f"reusing {run.adapter}"
    ckpt = run.work_dir / "train-ckpt"
    tcfg = TrainConfig(
        steps=cfg.steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        block_size=cfg.block_size,
        seed=cfg.seed,
        checkpoint_dir=str(ckpt),
        checkpoint_every=10,
        # the engine's own validation (its slice of the client's data) at the demo's scale
        eval_batches=max(1, cfg.eval_blocks // cfg.batch_size) if cfg.eval_blocks else None,
    )
    with run.progress(f"{cfg.steps} steps, batch {cfg.batch_size} x {cfg.block_size} tokens", cfg.steps) as update:
        result = train_adapter(
            run.bundle,
            run.train_examples,
            tcfg,
            progress=False,
            log=lambda m: None,
            on_step=lambda step, loss: update(step, f"step {step}/{cfg.steps} loss {loss:.3f}"),
        )
    # The engine may leave frozen weights in a lower precision; evaluate a fresh fp32 copy.
    run.bundle = load_bundle(run.bundle_dir, run.pub)
    run.bundle.load_adapter_state(result.adapter_state)
    run.training = {
        "engine": "offsite.client.engine",
        **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))},
    }
    save_adapter(
        run.adapter,
        run.bundle.adapter_state(),
        run.bundle.base_digest,
        bundle_manifest_sha256=run.bundle.manifest_sha256,
        demo_steps=cfg.steps,
        demo_lr=cfg.lr,
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    run.ppl["emulator_finetuned"] = run.perplexity(run.bundle.model, "emulator + trained adapter")
    return f"wrote {run.adapter}"


def stage_plugin(run: DemoRun) -> str:
    from offsite.emulators.adapter import load_adapter
    from offsite.emulators.plugin import export_model_dir, plug_in

    run.bundle = None  # the emulator is done with; free it before the full model grows
    state, meta = load_adapter(run.adapter)
    plug_in(run.loaded, state, meta)
    run.ppl["plugin"] = run.perplexity(run.loaded.model, "full model + plugged-in adapter")
    if not run.cfg.export:
        return "plugged in (not exported: --no-export)"
    export_model_dir(
        run.loaded.model,
        run.loaded.tokenizer,
        run.candidate,
        overwrite=True,
        provenance={
            "base_model_id": run.loaded.model_id,
            "base_model_digest": run.loaded.digest,
            "adapter": str(run.adapter),
        },
    )
    return f"exported {run.candidate} (AutoModelForCausalLM.from_pretrained loads it)"


def stage_federation(run: DemoRun) -> str:
    from .demo_federation import run_federation

    run.loaded = None  # the simulated data owners and the gate load their own copies
    with library_output_to(run.log, run):
        job = run_federation(run, run.say)
    rounds = [
        {"round": r["round"], "clients": len(r["clients"]), "plugin_ppl": r.get("plugin_ppl")} for r in job["rounds"]
    ]
    run.federation = {
        "job_id": job["id"],
        "rounds": rounds,
        "release": {
            "id": job["release"]["id"],
            "status": job["release"].get("status", "pending-gate"),
            "model_dir": job["release"]["model_dir"],
        },
    }
    return f"job {job['id']}: candidate release {job['release']['id']} (pending-gate)"


def stage_gate(run: DemoRun) -> str:
    from .demo_federation import run_gate

    gate = run_gate(run, run.federation["release"])
    run.federation["release"]["status"] = gate.pop("release_status")
    run.federation["gate"] = gate
    return (
        f"{gate['verdict']} (overall level {gate['overall_level']}): release {run.federation['release']['id']} "
        f"is {run.federation['release']['status']}"
    )


@dataclass(frozen=True)
class Stage:
    name: str
    party: str  # who does this in a real deployment
    what: str
    run: Callable[[DemoRun], str]  # does the work (or finds it done); returns one line for the user
    federated: bool = False  # part of the rounds-and-gate half (skipped with --rounds 0)


STAGES: tuple[Stage, ...] = (
    Stage("keys", "model owner", "the signing key", stage_keys),
    Stage("bundle", "model owner", "build and sign the emulator bundle", stage_bundle),
    Stage("verify", "data owner", "verify the bundle's signature and files, load the emulator", stage_verify),
    Stage("zero-shot", "both", "held-out perplexity of the full model and the emulator", stage_zero_shot),
    Stage("fine-tune", "data owner", "train the adapter on the emulator with the client engine", stage_finetune),
    Stage("plug-in", "model owner", "plug the adapter into the full model, export the candidate", stage_plugin),
    Stage(
        "federation",
        "both",
        "simulated data owners train in federated rounds (Flower, FedAvg)",
        stage_federation,
        federated=True,
    ),
    Stage(
        "gate",
        "model owner",
        "safety suites on the candidate vs the base model; approve or block",
        stage_gate,
        federated=True,
    ),
)


def _mb(run: DemoRun) -> int:
    return round(sum(f["size"] for f in run.manifest["files"].values()) / 1e6)


def run_demo(work_dir: Path, cfg: DemoConfig, out: Console | None = None) -> dict:
    """Run (or resume) every stage in `work_dir`; returns what `--json` prints (also demo-results.json)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the stages show their own progress; no per-load bars
    if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins (shared machines)
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    work_dir.mkdir(parents=True, exist_ok=True)
    run = DemoRun(work_dir, cfg, out=out or err_console)
    stages = [s for s in STAGES if cfg.rounds > 0 or not s.federated]
    started, timings = time.time(), {}
    for i, stage in enumerate(stages, 1):
        t = time.time()
        run.say(f"[bold][{i}/{len(stages)}] {stage.name}[/bold] ({stage.party}): {stage.what}")
        outcome = stage.run(run)
        timings[f"{stage.name}_s"] = round(time.time() - t, 1)
        run.say(f"      {outcome} [dim]({time.time() - t:.0f} s)[/dim]")
    zs, pl, ef = run.ppl["full_zero_shot"], run.ppl["plugin"], run.ppl["emulator_finetuned"]
    result = {
        "ok": True,
        "work_dir": str(work_dir),
        "config": {**asdict(cfg), "adapter_layers": list(cfg.adapter_layers), "gate_suites": list(cfg.gate_suites)},
        "stages": [s.name for s in stages],
        "ppl": run.ppl,
        "plugin_gain_log_ppl": math.log(zs) - math.log(pl),
        "protection_ratio": ef / pl,  # emulator + adapter vs plug-in: > 1 means the bundle alone is worse
        "bundle_bytes": sum(f["size"] for f in run.manifest["files"].values()),
        "full_model_fp32_bytes": run.manifest["base_model"].get("fp32_bytes"),
        "eval_tokens": run.heldout.n_loss_tokens,
        "training": run.training,
        "federation": run.federation,  # rounds, candidate release and the gate's verdict (None: --rounds 0)
        "timings": {**timings, "total_s": round(time.time() - started, 1)},
        "paths": {
            "keys": str(run.keys_dir),
            "bundle": str(run.bundle_dir),
            "adapter": str(run.adapter),
            "candidate": str(run.candidate) if cfg.export else None,
            "registry": str(run.fed_dir / "registry.db") if run.federation else None,
            "gate_report": str(run.gate_dir / "report.html") if run.federation else None,
            "results": str(run.results),
            "library_log": str(run.log) if run.log.exists() else None,
        },
    }
    run.results.write_text(json.dumps(result, indent=2) + "\n")
    return result
