"""The Models and Emulators servicers: register base models, build or register signed bundles."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

from offsite.protos.v1 import models_pb2, models_pb2_grpc

from .. import convert
from ..artifacts import check_sha256
from ..auth import current_principal
from ..hooks import load_hook
from ..operations import OperationContext, OperationResult
from ..registry import Conflict, NotFound
from ..state import NAME_RE, ServerState
from .common import limit_of, require

_QUANT = ("none", "int8", "int4", "int3", "int2")


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def RegisterModel(self, request, context):
        if not NAME_RE.match(request.name):
            raise ValueError(
                f"model name {request.name!r}: 1-64 letters, digits, . _ - (starting with a letter or digit)"
            )
        source = self.s.resolve_model_source(request.source or request.name)
        try:
            self.s.registry.get_model(request.name)
            raise Conflict(f"a model named {request.name!r} is already registered; pick another name")
        except NotFound:
            pass
        info = await asyncio.to_thread(_inspect_model, source)
        row = self.s.registry.add_model(
            request.name, source if request.source else request.name, **info, description=request.description[:2000]
        )
        return convert.model(row)

    async def GetModel(self, request, context):
        return convert.model(self.s.registry.get_model(require(request.id, "id")))

    async def ListModels(self, request, context):
        return models_pb2.ListModelsResponse(
            models=[convert.model(r) for r in self.s.registry.list_models(limit=limit_of(request.limit))]
        )


def _inspect_model(source: str) -> dict:
    from offsite.emulators.models import load_model

    loaded = load_model(source)
    return {
        "family": loaded.family.name,
        "digest": loaded.digest,
        "num_layers": int(loaded.family.num_layers(loaded.model.config)),
    }


def _build_config_dict(cfg: models_pb2.EmulatorBuildConfig) -> dict:
    """Only the fields the caller set, so BuildConfig's defaults apply to the rest."""
    out: dict = {}
    if cfg.adapter_layers:
        if len(cfg.adapter_layers) != 2 or min(cfg.adapter_layers) < 0:
            raise ValueError("adapter_layers needs two non-negative numbers: [bottom, top], e.g. [2, 2]")
        out["adapter_layers"] = tuple(cfg.adapter_layers)
    if cfg.emulator_layers:
        out["emulator_layers"] = cfg.emulator_layers
    if cfg.distill_steps < 0 or cfg.distill_steps > 1_000_000:
        raise ValueError("distill_steps must be between 0 and 1000000")
    if cfg.distill_steps:
        out["distill_steps"] = cfg.distill_steps
    if cfg.quantize:
        if cfg.quantize not in _QUANT:
            raise ValueError(f"quantize {cfg.quantize!r} is not one of {', '.join(_QUANT)}")
        out["quantize"] = cfg.quantize
    if cfg.awq:
        out["awq"] = True
    if cfg.corpus:
        if cfg.corpus != "python-reference":
            raise ValueError(
                "corpus: only 'python-reference' can be named over the API (server-side paths are not accepted)"
            )
        out["corpus"] = cfg.corpus
    if cfg.block_size:
        if not 8 <= cfg.block_size <= 8192:
            raise ValueError("block_size must be between 8 and 8192")
        out["block_size"] = cfg.block_size
    if cfg.seed:
        out["seed"] = cfg.seed
    if cfg.kept:
        out["kept"] = list(cfg.kept)
    return out


class EmulatorsService(models_pb2_grpc.EmulatorsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def BuildEmulator(self, request, context):
        model = self.s.registry.get_model(require(request.model, "model"))
        cfg = _build_config_dict(request.config)
        builder = load_hook(self.s.config.emulator_builder)
        s = self.s

        def work(ctx: OperationContext) -> OperationResult:
            tmp = Path(tempfile.mkdtemp(prefix=f"build-{ctx.op_id}-", dir=s.work_dir))
            try:
                ctx.progress(0.0, f"building an emulator of {model.name}")
                source = s.resolve_model_source(model.source)
                manifest = builder(
                    {**cfg, "model": source},
                    s.signing_key,
                    tmp / "bundle",
                    lambda f, m="": ctx.progress(0.95 * float(f), m),
                )
                ctx.progress(0.96, "storing the bundle")
                sha = s.store.put_dir_as_tar(tmp / "bundle")
                s.registry.add_artifact(sha, s.store.size(sha), "bundle", f"{model.name}-emulator.tar")
                emu = s.registry.add_emulator(model.id, sha, _jsonable(cfg), manifest, ctx.op_id)
                return OperationResult(
                    resource=f"emulators/{emu.id}", result={"emulator_id": emu.id, "bundle_sha256": sha}
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        row = s.ops.start("emulator-build", work, created_by=current_principal().name)
        return convert.operation(row)

    async def RegisterEmulator(self, request, context):
        model = self.s.registry.get_model(require(request.model, "model"))
        sha = check_sha256(request.bundle_sha256)
        path = self.s.store.path(sha)
        if not path.is_file():
            raise NotFound(f"no artifact {sha}; upload the bundle tar first (Artifacts.Upload)")
        from offsite.emulators.bundle import BundleError, verify_bundle

        try:
            manifest = await asyncio.to_thread(
                verify_bundle, path, self.s.verification_keys
            )  # any key it has signed with
        except BundleError as e:
            raise ValueError(f"the uploaded bundle does not verify with this server's signing key: {e}") from None
        base = manifest.get("base_model", {}) if isinstance(manifest.get("base_model"), dict) else {}
        digest = base.get("digest") or manifest.get("base_model_digest") or ""
        if model.digest and digest and digest != model.digest:
            raise ValueError(
                f"the bundle was built from a model with digest {digest[:12]}..., not {model.name} "
                f"({model.digest[:12]}...)"
            )
        self.s.registry.add_artifact(sha, self.s.store.size(sha), "bundle", f"{model.name}-emulator.tar")
        row = self.s.registry.add_emulator(model.id, sha, {}, manifest)
        return convert.emulator(self.s.registry, row)

    async def GetEmulator(self, request, context):
        return convert.emulator(self.s.registry, self.s.registry.get_emulator(require(request.id, "id")))

    async def ListEmulators(self, request, context):
        model_id = self.s.registry.get_model(request.model).id if request.model else None
        rows = self.s.registry.list_emulators(model_id=model_id, limit=limit_of(request.limit))
        return models_pb2.ListEmulatorsResponse(emulators=[convert.emulator(self.s.registry, r) for r in rows])


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))
