"""Releases.MergeReleases: merge the adapters of several releases of one base model into a
new candidate release (``pending-gate``, its parents recorded), gated like any other.

Everything a request can get wrong is checked before the operation starts, so a refused
merge creates nothing: at least two distinct releases that exist and carry an adapter, all of
one base model (the mismatch is named), none rejected, none still pending or blocked unless
``allow_ungated`` (admins only, written to the audit log), merge options the library accepts
(one weight per release). The operation then loads the base model, merges by
``offsite.emulators.merge`` and stores the adapter as an artifact before the release row is
written, so a failed merge leaves no release behind.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .operations import OperationContext, OperationResult
from .registry import Conflict, ReleaseRow

GATED = ("approved", "released")
UNGATED = ("pending-gate", "blocked")
MAX_PARENTS = 16  # each parent is one adapter in memory during the merge
_RELEASE_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class MergePlan:
    parents: list[ReleaseRow]
    model_id: str
    config: object  # offsite.emulators.merge.MergeConfig
    ungated: list[str]  # parents merged although pending or blocked (allow_ungated)


def plan_merge(
    registry, release_ids: list[str], config, allow_ungated: bool = False, is_admin: bool = False
) -> MergePlan:
    """Check a merge request against the registry; raises (ValueError, Conflict, NotFound,
    PermissionError) with a message naming the problem and the fix. Creates nothing."""
    ids = [i.strip() for i in release_ids]
    if len(ids) < 2:
        raise ValueError(f"a merge needs at least two releases, got {len(ids)}: name two or more release ids")
    if len(ids) > MAX_PARENTS:
        raise ValueError(f"at most {MAX_PARENTS} releases can be merged at once, got {len(ids)}")
    bad = [i for i in ids if not _RELEASE_ID.match(i)]
    if bad:
        raise ValueError(f"{bad[0][:40]!r} is not a release id; `offsite-admin releases list` shows them")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"release {dupes[0]} is named twice; to weigh it more, use --weights")
    config.validate(len(ids))  # MergeError (a ValueError): method, weights count, ranges
    parents = [registry.get_release(i) for i in ids]
    first = parents[0]
    for rel in parents[1:]:
        if rel.model_id != first.model_id:
            a, b = _model_name(registry, first.model_id), _model_name(registry, rel.model_id)
            raise Conflict(
                f"release {rel.id} is of base model {b}, release {first.id} of {a}: "
                "only releases of the same base model can be merged"
            )
    for rel in parents:
        if not rel.adapter_sha256:
            raise Conflict(f"release {rel.id} has no adapter artifact to merge")
        if rel.status == "rejected":
            raise Conflict(f"release {rel.id} was rejected ({rel.reason or 'no reason given'}); it cannot be merged")
    ungated = [r.id for r in parents if r.status in UNGATED]
    if ungated and not allow_ungated:
        what = ", ".join(f"{r.id} ({r.status})" for r in parents if r.id in ungated)
        raise Conflict(
            f"releases not yet through the safety gate: {what}; merge approved releases, or pass "
            "--allow-ungated (admins only, audited) to merge them anyway (the merge is gated itself)"
        )
    if ungated and not is_admin:
        raise PermissionError(
            "--allow-ungated is for admins only: merging releases the gate has not passed is an override"
        )
    return MergePlan(parents=parents, model_id=first.model_id, config=config, ungated=ungated)


def config_from_request(request):
    """The MergeConfig a MergeReleasesRequest asks for (unset options keep the library's defaults)."""
    from offsite.emulators.merge import MergeConfig

    fields = {"method": request.method or "ties"}
    if request.weights:
        fields["weights"] = tuple(request.weights)
    for name in ("scale", "density", "drop_rate", "seed"):
        if request.HasField(name):
            fields[name] = getattr(request, name)
    if request.majority_sign:
        fields["majority_sign"] = request.majority_sign
    return MergeConfig(**fields)


def audit_ungated(registry, principal, plan: MergePlan) -> None:
    """The allow_ungated override, in the audit log with the parents' statuses."""
    what = ", ".join(f"{r.id} ({r.status})" for r in plan.parents if r.id in plan.ungated)
    registry.audit(
        principal.name,
        principal.role,
        "/offsite.v1.Releases/MergeReleases",
        ",".join(r.id for r in plan.parents),
        "allow-ungated",
        f"merging releases not through the gate: {what}",
    )


def _model_name(registry, model_id: str) -> str:
    try:
        m = registry.get_model(model_id)
        return f"{m.name!r} (digest {m.digest[:12]}...)" if m.digest else repr(m.name)
    except LookupError:
        return repr(model_id)


def merge_work(state, plan: MergePlan):
    """The operation's work function: merge, store the adapter, record the release."""
    registry, store = state.registry, state.store
    model = registry.get_model(plan.model_id)
    ids = [r.id for r in plan.parents]

    def work(ctx: OperationContext) -> OperationResult:
        from offsite.emulators.adapter import load_adapter, save_adapter
        from offsite.emulators.merge import merge_adapters
        from offsite.emulators.models import load_model

        ctx.progress(0.05, f"loading base model {model.name}")
        loaded = load_model(state.resolve_model_source(model.source))
        adapters = []
        for i, rel in enumerate(plan.parents):
            ctx.check_cancelled()
            ctx.progress(0.3 + 0.3 * i / len(plan.parents), f"reading the adapter of {rel.id}")
            adapters.append(load_adapter(store.path(rel.adapter_sha256)))
        ctx.progress(0.65, f"merging {len(ids)} adapters ({plan.config.method})")
        state_dict, meta = merge_adapters(loaded, adapters, plan.config, labels=[f"release {i}" for i in ids])
        tmp = Path(tempfile.mkdtemp(prefix=f"merge-{ctx.op_id}-", dir=state.work_dir))
        try:
            path = save_adapter(
                tmp / "merged.safetensors",
                state_dict,
                meta["base_model_digest"],
                merge=meta["merge"],
                parents=json.dumps(ids),
                base_model=model.name,
            )
            ctx.check_cancelled()
            ctx.progress(0.9, "storing the merged adapter")
            sha = store.put_file(path)
            registry.add_artifact(sha, store.size(sha), "adapter", f"merge-{ctx.op_id}.safetensors")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        metrics = {"merge": plan.config.hyperparameters(), "parents": ids}
        if plan.ungated:
            metrics["ungated_parents"] = plan.ungated
        rel = registry.create_release("", plan.model_id, sha, metrics, parents=ids)
        return OperationResult(
            resource=f"releases/{rel.id}", result={"release_id": rel.id, "parents": ids, "adapter_sha256": sha}
        )

    return work
