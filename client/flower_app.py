"""The data owner's Flower `ClientApp`: train the adapter on local data, send only the adapter.

What travels in Flower messages is the adapter (fp32 arrays keyed by the base model's
parameter names) and numeric metrics. The emulator never does: each client loads the
signed bundle from its local cache, by the bundle artifact's sha256 (`offsite-client
fetch` or the job runner put it there), and verifies it with the model owner's public key.

Settings come from the SuperNode's node config in a deployment (`--node-config
"data='...' bundle-cache='...' public-key='...'"`), or from `ClientSettings` given to
`make_client_app` in the simulation engine. In a simulation, `{partition}` in `data` is
replaced by the node's partition id, so one template serves N data owners.

Routes: the default train route (Message API FedAvg, with `fixedclipping_mod` when the
server asks for DP; the reply is the whole fp32 adapter, or with `upload` = sparse-fp16 /
sparse-int8 only the deltas of what this client trained, `offsite.wire`), and the same route speaking the legacy SecAgg+ protocol when the
server runs Flower's SecAggPlusWorkflow (`secaggplus_mod`). Under SecAgg+ the client sends
its *update* (adapter minus the global adapter) in the sorted-name order both sides agree
on, since that path drops names and quantizes values to a bounded range.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from offsite.emulators.data import PYTHON_REFERENCE, load_examples, python_reference_split
from offsite.wire import encode_sparse_delta, record_to_state


class ClientSetupError(RuntimeError):
    """The data owner's node is missing its bundle, key or data; the message says how to fix it."""


@dataclass
class ClientSettings:
    data: str = ""  # JSONL/text file or dir; "python-reference:{partition}/N" for the demo corpus
    bundle_cache: str = ""  # directory holding bundles by digest: CACHE/<digest>/
    public_key: str = ""  # the model owner's signing.pub ("" = skip verification: trusted local copy)
    threads: int = 1  # torch threads per training process

    def resolved(self, node_config: dict) -> "ClientSettings":
        """Node config overrides (deployment), then `{partition}` substitution (simulation)."""
        over = {}
        for f in fields(self):
            key = f.name.replace("_", "-")
            if key in node_config:
                over[f.name] = type(getattr(self, f.name))(node_config[key])
        s = replace(self, **over)
        part = node_config.get("partition-id")
        if part is not None:
            s = replace(s, data=s.data.replace("{partition}", str(part)))
        return s


# --- cached state per process (a Ray worker serves many virtual clients) ------------

_BUNDLES: dict[str, object] = {}


def load_cached_bundle(digest: str, settings: ClientSettings):
    """The bundle with this digest from the local cache, loaded and verified once per process."""
    if digest in _BUNDLES:
        return _BUNDLES[digest]
    from offsite.emulators.bundle import load_bundle

    from offsite.client.fetch import bundle_cache_dir

    cache = Path(settings.bundle_cache) if settings.bundle_cache else bundle_cache_dir()
    path = cache / digest
    if not path.exists():
        raise ClientSetupError(
            f"bundle {digest[:12]} is not in the bundle cache {cache}; fetch it first "
            "(`offsite-client enroll ...` then `offsite-client fetch --job JOB`), or point the node at the cache "
            "with --node-config \"bundle-cache='DIR'\""
        )
    if not settings.public_key:
        raise ClientSetupError(
            "no public key to verify the bundle with; start the node with --node-config \"public-key='signing.pub'\""
        )
    bundle = load_bundle(path, settings.public_key, runtime="auto")  # the lean runtime where it applies
    _BUNDLES.clear()  # one bundle per process: the emulator is the largest thing a client holds
    _BUNDLES[digest] = bundle
    return bundle


_EXAMPLES: dict[str, list] = {}


def load_client_examples(spec: str, tokenizer) -> list:
    if spec in _EXAMPLES:
        return _EXAMPLES[spec]
    if not spec:
        raise ClientSetupError("no training data configured; start the node with --node-config \"data='my.jsonl'\"")
    if spec.startswith(PYTHON_REFERENCE + ":"):
        # "python-reference:i/N": shard i of the demo corpus split N ways (the simulation's data owners)
        try:
            i, n = (int(x) for x in spec.split(":", 1)[1].split("/"))
        except ValueError:
            raise ClientSetupError(
                f"{spec!r}: expected python-reference:SHARD/NUM_SHARDS, e.g. python-reference:0/3"
            ) from None
        examples = python_reference_split(n).shards[i]
    else:
        examples = load_examples(spec, tokenizer)
    _EXAMPLES.clear()
    _EXAMPLES[spec] = examples
    return examples


# --- training ----------------------------------------------------------------------


def _train_config(cfg) -> object:
    from offsite.client.engine import TrainConfig

    return TrainConfig(
        scheme=str(cfg.get("scheme", "full")),
        steps=int(cfg.get("local-steps", 10)),
        lr=float(cfg.get("lr", 1e-4)),
        batch_size=int(cfg.get("batch-size", 4)),
        block_size=int(cfg.get("block-size", 256)),
        seed=int(cfg.get("seed", 0)) * 100003 + int(cfg.get("server-round", 0)),
        eval_fraction=float(cfg.get("eval-fraction", 0.1)),
    )


def train_local(
    global_state: dict[str, torch.Tensor], cfg, settings: ClientSettings
) -> tuple[dict[str, torch.Tensor], dict]:
    """One round of local training: (adapter state by original names, numeric metrics)."""
    from offsite.client.engine import train_adapter

    torch.set_num_threads(max(1, settings.threads))
    bundle = load_cached_bundle(str(cfg["bundle-digest"]), settings)
    examples = load_client_examples(settings.data, bundle.tokenizer)
    started = time.perf_counter()
    result = train_adapter(bundle, examples, _train_config(cfg), progress=False, initial_adapter=global_state)
    metrics = {"num-examples": len(examples), "unit-weight": 1.0, "train-seconds": time.perf_counter() - started}
    for key in (
        "loss_first",
        "loss_last",
        "eval_ppl_before",
        "eval_ppl_after",
        "tokens",
        "peak_rss_mb",
        "tokens_per_s",
    ):
        value = result.metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            metrics[key.replace("_", "-")] = float(value)
    state = {k: v.detach().to(torch.float32).cpu() for k, v in result.adapter_state.items()}
    return state, metrics


def _message_api_train(msg: Message, ctx: Context, settings: ClientSettings) -> Message:
    arrays = msg.content["arrays"]
    cfg = msg.content["config"]
    global_state = record_to_state(arrays)
    state, metrics = train_local(global_state, cfg, settings.resolved(ctx.node_config))
    upload = str(cfg.get("upload", "full"))
    if upload == "full":
        # Same names, same order as received: fixedclipping_mod compares the key lists.
        record = ArrayRecord(
            {k: Array(state[k].detach().to(torch.float32).contiguous().numpy()) for k in arrays.keys()}
        )
    else:
        record, upload_metrics = encode_sparse_delta(
            {k: v.numpy() for k, v in state.items()}, {k: v.numpy() for k, v in global_state.items()}, upload
        )
        metrics.update(upload_metrics)
    reply = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


def _legacy_secagg_train(msg: Message, ctx: Context, settings: ClientSettings) -> Message:
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    cfg = dict(fitins.config)
    s = settings.resolved(ctx.node_config)
    bundle = load_cached_bundle(str(cfg["bundle-digest"]), s)
    names = sorted(bundle.adapter_state())  # the agreed order; SecAgg+ carries no names
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ClientSetupError(f"the server sent {len(arrays)} arrays for an adapter of {len(names)} tensors")
    global_state = {n: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for n, a in zip(names, arrays)}
    state, metrics = train_local(global_state, cfg, s)
    update = [state[n].numpy().astype(np.float64) - global_state[n].numpy() for n in names]
    bound = float(cfg.get("norm-bound", 0.0))
    norm = math.sqrt(sum(float(np.dot(u.ravel(), u.ravel())) for u in update))
    if bound > 0 and norm > bound:  # the server cannot see one update under SecAgg+, so the client bounds it
        update = [u * (bound / norm) for u in update]
    metrics["update-norm"] = norm
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), int(metrics["num-examples"]), metrics)
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def train_handler(msg: Message, ctx: Context, settings: ClientSettings) -> Message:
    """Route one train message: SecAgg+ stages, DP clipping, or plain FedAvg."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctx, lambda m, c: _legacy_secagg_train(m, c, settings))
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, ctx, lambda m, c: _message_api_train(m, c, settings))
    return _message_api_train(msg, ctx, settings)


def make_client_app(settings: ClientSettings | None = None) -> ClientApp:
    settings = settings or ClientSettings(threads=int(os.environ.get("OFFSITE_CLIENT_THREADS", "1")))
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, ctx: Context) -> Message:
        return train_handler(msg, ctx, settings)

    return client_app


# `flwr run` and SuperNodes load this object: settings come from the node config.
app = make_client_app()
