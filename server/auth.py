"""API tokens, roles, and the interceptor that enforces them on every offsite.v1 method.

A token is ``ofs_`` + 43 url-safe random characters (256 bits). The registry keeps only
its sha256: a token that high in entropy needs no slow password hash, and a stolen
database gives no usable token. Callers send it as ``authorization: Bearer <token>``.

Roles:
- ``admin``: everything, including tokens, the audit log and approving releases.
- ``partner``: models, emulators, jobs, releases (read and export), evals, operations.
- ``data-owner``: enroll in the jobs its token names, then see only those jobs and fetch
  only their bundles.

The interceptor fails closed: an offsite.v1 method missing from ``METHOD_ROLES`` is refused
for every role. It also maps the registry's and store's exceptions to status codes with the
message intact, and writes every mutating call (and every refusal) to the audit table.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import grpc

from .errors import _ECHO_LIMIT, _tolerant, _Undecodable, scrub, status_for
from .registry import ROLES, Registry, utcnow

log = logging.getLogger(__name__)

TOKEN_PREFIX = "ofs_"
MAX_TTL_S = 10 * 365 * 24 * 3600
_UNAUTH_AUDIT_PER_MIN = 60  # unauthenticated refusals audited per minute (the rest are counted)
ADMIN, PARTNER, DATA_OWNER = "admin", "partner", "data-owner"
_STAFF = frozenset({ADMIN, PARTNER})
_EVERYONE = frozenset(ROLES)
_ADMIN_ONLY = frozenset({ADMIN})

# Full method name -> roles allowed. Data-owner visibility inside a method (which jobs,
# which artifacts) is checked by the service itself.
METHOD_ROLES: dict[str, frozenset[str]] = {
    "/offsite.v1.Identity/WhoAmI": _EVERYONE,
    "/offsite.v1.Admin/CreateToken": _ADMIN_ONLY,
    "/offsite.v1.Admin/ListTokens": _ADMIN_ONLY,
    "/offsite.v1.Admin/RevokeToken": _ADMIN_ONLY,
    "/offsite.v1.Admin/RotateToken": _ADMIN_ONLY,
    "/offsite.v1.Admin/ListAudit": _ADMIN_ONLY,
    "/offsite.v1.Models/RegisterModel": _STAFF,
    "/offsite.v1.Models/GetModel": _STAFF,
    "/offsite.v1.Models/ListModels": _STAFF,
    "/offsite.v1.Emulators/BuildEmulator": _STAFF,
    "/offsite.v1.Emulators/RegisterEmulator": _STAFF,
    "/offsite.v1.Emulators/GetEmulator": _STAFF,
    "/offsite.v1.Emulators/ListEmulators": _STAFF,
    "/offsite.v1.Artifacts/StatArtifact": _EVERYONE,
    "/offsite.v1.Artifacts/Download": _EVERYONE,
    "/offsite.v1.Artifacts/Upload": _STAFF,
    "/offsite.v1.Jobs/CreateJob": _STAFF,
    "/offsite.v1.Jobs/GetJob": _EVERYONE,
    "/offsite.v1.Jobs/ListJobs": _EVERYONE,
    "/offsite.v1.Jobs/ListRounds": _EVERYONE,
    "/offsite.v1.Jobs/WatchJob": _EVERYONE,
    "/offsite.v1.Jobs/Enroll": frozenset({ADMIN, DATA_OWNER}),
    "/offsite.v1.Jobs/StartJob": _STAFF,
    "/offsite.v1.Jobs/CancelJob": _STAFF,
    "/offsite.v1.Releases/ListReleases": _STAFF,
    "/offsite.v1.Releases/GetRelease": _STAFF,
    "/offsite.v1.Releases/ApproveRelease": _ADMIN_ONLY,
    "/offsite.v1.Releases/RejectRelease": _ADMIN_ONLY,
    "/offsite.v1.Releases/ExportRelease": _STAFF,
    "/offsite.v1.Releases/MergeReleases": _STAFF,  # allow_ungated: admins only (checked in the service)
    "/offsite.v1.Evals/RunEval": _STAFF,
    "/offsite.v1.Evals/GetEvalReport": _STAFF,
    "/offsite.v1.Evals/ListEvalReports": _STAFF,
    "/offsite.v1.Evals/CreateEvalSchedule": _STAFF,
    "/offsite.v1.Evals/ListEvalSchedules": _STAFF,
    "/offsite.v1.Evals/DeleteEvalSchedule": _STAFF,
    "/offsite.v1.Operations/GetOperation": _STAFF,
    "/offsite.v1.Operations/ListOperations": _STAFF,
    "/offsite.v1.Operations/WatchOperation": _STAFF,
    "/offsite.v1.Operations/CancelOperation": _STAFF,
}

_MUTATING_PREFIXES = (
    "Create",
    "Register",
    "Build",
    "Approve",
    "Reject",
    "Export",
    "Revoke",
    "Delete",
    "Start",
    "Cancel",
    "Enroll",
    "Upload",
    "Run",
)


@dataclass(frozen=True)
class Principal:
    token_id: str
    name: str
    role: str
    jobs: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_staff(self) -> bool:
        return self.role in _STAFF


CURRENT_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("offsite_principal", default=None)


def current_principal() -> Principal:
    p = CURRENT_PRINCIPAL.get()
    if p is None:  # only reachable if a service is called outside the interceptor
        raise PermissionError("no authenticated caller")
    return p


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Authenticator:
    """Resolves bearer tokens to principals, with a short cache so hot RPCs skip the database.

    Revocation through this server invalidates the cache at once; a revocation made by
    another process sharing the database takes effect within `cache_ttl_s`.
    """

    def __init__(self, registry: Registry, cache_ttl_s: float = 5.0) -> None:
        self.registry = registry
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal, datetime | None]] = {}

    def create_token(
        self, name: str, role: str, jobs: list[str] | None = None, ttl_seconds: int = 0
    ) -> tuple[str, object]:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not name or len(name) > 128:
            raise ValueError("a token needs a name of 1-128 characters (for data owners: the data owner's name)")
        if not 0 <= ttl_seconds <= MAX_TTL_S:
            raise ValueError(f"ttl_seconds must be between 0 (no expiry) and {MAX_TTL_S} (ten years)")
        secret = new_token_secret()
        expires = utcnow() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        row = self.registry.add_token(
            name=name, role=role, secret_hash=hash_secret(secret), jobs=jobs or [], expires_at=expires
        )
        return secret, row

    def rotate(self, token_id: str, ttl_seconds: int = 0) -> tuple[str, object]:
        """A new secret for the token's name, role and jobs (its enrollments move over) and the
        old token revoked. `ttl_seconds` 0 keeps the old token's lifetime (never, if it had none)."""
        if not 0 <= ttl_seconds <= MAX_TTL_S:
            raise ValueError(f"ttl_seconds must be between 0 (the old token's lifetime) and {MAX_TTL_S} (ten years)")
        old = self.registry.get_token(token_id)
        if not ttl_seconds and old.expires_at is not None and old.created_at is not None:
            ttl_seconds = max(1, int((old.expires_at - old.created_at).total_seconds()))
        secret = new_token_secret()
        expires = utcnow() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        row = self.registry.rotate_token(token_id, hash_secret(secret), expires)
        self._cache.pop(old.secret_hash, None)
        return secret, row

    def revoke(self, token_id: str):
        row = self.registry.revoke_token(token_id)
        self._cache.pop(row.secret_hash, None)
        return row

    def authenticate(self, authorization: str | None) -> Principal:
        """Principal for an `authorization` header value; PermissionError-free: raises _AuthError."""
        if not authorization:
            raise _AuthError("missing `authorization: Bearer <token>` metadata; pass --token or set OFFSITE_TOKEN")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.startswith(TOKEN_PREFIX):
            raise _AuthError("malformed authorization metadata; expected `Bearer ofs_...`")
        key = hash_secret(secret.strip())
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.cache_ttl_s:
            _, principal, expires = hit
        else:
            row = self.registry.token_by_hash(key)
            if row is None or row.revoked_at is not None:
                self._cache.pop(key, None)
                raise _AuthError("invalid or revoked token; ask an admin for a new one (offsite-admin tokens create)")
            principal = Principal(token_id=row.id, name=row.name, role=row.role, jobs=tuple(row.jobs or ()))
            expires = row.expires_at
            self._cache[key] = (now, principal, expires)
        if expires is not None and utcnow() >= expires:
            raise _AuthError("token expired; ask an admin for a new one")
        return principal


class _AuthError(Exception):
    pass


def _is_mutating(method: str) -> bool:
    return method.rsplit("/", 1)[-1].startswith(_MUTATING_PREFIXES)


def _target_of(request) -> str:
    for attr in ("id", "job_id", "sha256", "name", "model", "candidate"):
        value = getattr(request, attr, None)
        if isinstance(value, str) and value:
            return value
    return ""


_ANONYMOUS = Principal(token_id="", name="(unauthenticated)", role="")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, authorises, maps errors and audits every offsite.v1 call.

    Requests are decoded by a tolerant deserializer, so bytes that are not the method's
    message (garbage, a Struct nested past protobuf's limit) reach this code as a value,
    and get UNAUTHENTICATED or INVALID_ARGUMENT, never UNKNOWN with a traceback in the log.
    Every refusal is audited; unauthenticated ones at most `_UNAUTH_AUDIT_PER_MIN` a minute
    (the rest are counted into the next entry), so a flood cannot fill the database.
    """

    def __init__(self, authenticator: Authenticator, registry: Registry, data_dir: str | None = None) -> None:
        self.auth = authenticator
        self.registry = registry
        self.data_dir = str(data_dir) if data_dir else None
        # One wrapped handler per method, built on first use: the token is read from the
        # call's metadata inside the wrapper, so nothing is rebuilt per call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._unauth_window = (0.0, 0, 0)  # (window start, audited in it, not audited)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or not method.startswith("/offsite.v1."):
            return handler  # health, reflection: public by design
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = wrapped
        return wrapped

    def _admit(
        self, method: str, authorization: str | None, peer: str = ""
    ) -> tuple[Principal | None, grpc.StatusCode | None, str]:
        try:
            principal = self.auth.authenticate(authorization)
        except _AuthError as e:
            self._audit_unauthenticated(method, peer, str(e))
            return None, grpc.StatusCode.UNAUTHENTICATED, str(e)
        allowed = METHOD_ROLES.get(method, frozenset())
        if principal.role not in allowed:
            who = ", ".join(sorted(allowed)) or "no role (the method is not open yet)"
            self._audit(principal, method, "", "PERMISSION_DENIED", f"role {principal.role}")
            return (
                principal,
                grpc.StatusCode.PERMISSION_DENIED,
                (f"role {principal.role!r} may not call {method}; allowed: {who}"),
            )
        return principal, None, ""

    def _audit_unauthenticated(self, method: str, peer: str, why: str) -> None:
        now = time.monotonic()
        start, audited, skipped = self._unauth_window
        if now - start >= 60.0:
            start, audited, skipped = now, 0, skipped
        if audited >= _UNAUTH_AUDIT_PER_MIN:
            self._unauth_window = (start, audited, skipped + 1)
            return
        detail = f"{why[:200]}; peer {peer[:100]}" + (f"; {skipped} earlier refusal(s) not audited" if skipped else "")
        self._unauth_window = (start, audited + 1, 0)
        self._audit(_ANONYMOUS, method, "", "UNAUTHENTICATED", detail)

    def _audit(self, principal: Principal, method: str, target: str, outcome: str, detail: str = "") -> None:
        try:
            self.registry.audit(principal.name, principal.role, method, target[:256], outcome, detail[:1000])
        except Exception:  # auditing must never take the API down
            log.warning("could not write audit entry for %s", method, exc_info=True)

    def _wrap(self, handler, method: str):
        mutating = _is_mutating(method)

        async def _deny_or_enter(context, request=None):
            authorization = None
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    authorization = value
                    break
            principal, code, msg = self._admit(method, authorization, context.peer() or "")
            if code is not None:
                await context.abort(code, msg)
            if isinstance(request, _Undecodable):
                msg = (
                    f"the request is not a valid message for {method} ({request.error}); "
                    "build it from the offsite.v1 protos"
                )
                self._audit(principal, method, "", "INVALID_ARGUMENT", msg)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg)
            return principal

        async def _fail(context, principal, exc, target, request=None):
            mapped = status_for(exc)
            if mapped is None:
                # A bug, not a bad request: the details stay in the log, the caller gets a reference.
                ref = uuid.uuid4().hex[:12]
                log.error("unexpected error in %s (ref %s)", method, ref, exc_info=exc)
                mapped = (
                    grpc.StatusCode.INTERNAL,
                    f"internal error in {method} (ref {ref}); the server log has the details",
                )
            code, msg = mapped[0], scrub(mapped[1], self.data_dir, request)
            self._audit(
                principal,
                method,
                scrub(target, None, None) if len(target) <= _ECHO_LIMIT else "<long>",
                code.name,
                msg[:500],
            )
            await context.abort(code, msg)

        def _leave(token) -> None:
            # A cancelled stream's generator may be closed from another context; nothing to undo there.
            try:
                CURRENT_PRINCIPAL.reset(token)
            except ValueError:
                pass

        decode = _tolerant(handler.request_deserializer, method)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                principal = await _deny_or_enter(context, request)
                token = CURRENT_PRINCIPAL.set(principal)
                target = _target_of(request)
                try:
                    response = await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _fail(context, principal, e, target, request)
                finally:
                    _leave(token)
                if mutating:
                    self._audit(principal, method, target or _target_of(response), "ok")
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=decode, response_serializer=handler.response_serializer
            )

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                principal = await _deny_or_enter(context, request)
                token = CURRENT_PRINCIPAL.set(principal)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    raise  # the client went away: nothing to report
                except Exception as e:
                    await _fail(context, principal, e, _target_of(request), request)
                finally:
                    _leave(token)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=decode, response_serializer=handler.response_serializer
            )

        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def checked(request_iterator, first: list):
                async for msg in request_iterator:
                    if isinstance(msg, _Undecodable):
                        raise ValueError(
                            f"a request message is not valid for {method} ({msg.error}); "
                            "build it from the offsite.v1 protos"
                        )
                    if not first:
                        first.append(msg)  # its strings are kept out of error messages
                    yield msg

            async def stream_unary(request_iterator, context):
                principal = await _deny_or_enter(context)
                token = CURRENT_PRINCIPAL.set(principal)
                first: list = []
                try:
                    response = await inner_su(checked(request_iterator, first), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _fail(context, principal, e, "", first[0] if first else None)
                finally:
                    _leave(token)
                if mutating:
                    self._audit(principal, method, _target_of(response), "ok")
                return response

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, request_deserializer=decode, response_serializer=handler.response_serializer
            )

        # Bidirectional streams: none in offsite.v1 yet; refuse rather than pass unchecked.
        async def refuse(_it, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: streaming kind not supported")

        return grpc.stream_stream_rpc_method_handler(refuse)
