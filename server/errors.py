"""How a refused or failed offsite.v1 call is told to the caller.

Exceptions raised in a servicer map to status codes (:func:`status_for`); messages are
scrubbed of absolute server paths and of long request values (:func:`scrub`); requests
that do not decode reach the interceptor as :class:`_Undecodable` values instead of
failing inside gRPC with UNKNOWN and a traceback (:func:`_tolerant`).
"""

from __future__ import annotations

import re

import grpc

from offsite.files import is_disk_full

from .artifacts import ArtifactCorrupt, ArtifactNotFound, InvalidDigest
from .hooks import HookUnavailable
from .operations import ShuttingDown
from .registry import Conflict, NotFound

_ECHO_LIMIT = 64  # request strings longer than this are never quoted back in an error
_DETAILS_LIMIT = 1000  # and no error message is longer than this


class TooManyStreams(RuntimeError):
    """A caller holds too many open streams of one kind."""


class _Undecodable:
    """What the tolerant deserializer returns for bytes that are not the method's message."""

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name, self.error = type_name, error


def _tolerant(deserializer, method: str):
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, RecursionError on deep nesting, ...
            return _Undecodable(method, type(e).__name__)

    return decode


_ABS_PATH = re.compile(r"(?<![\w.:/-])/(?:[^\s'\"/:,;)]+/)*[^\s'\"/:,;)]+(?=[\s'\",;:)]|$)")


def scrub(message: str, data_dir: str | None = None, request=None) -> str:
    """An error message fit to send: no absolute server path, no long echo of request values."""
    if request is not None:
        for value in _request_strings(request):
            if len(value) > _ECHO_LIMIT:
                message = message.replace(value, f"<{len(value)} characters>")
                message = message.replace(repr(value), f"<{len(value)} characters>")
    if data_dir:
        message = message.replace(str(data_dir), "DATA_DIR")
    message = _ABS_PATH.sub(lambda m: m.group(0) if m.group(0).startswith("/offsite.") else "<path>", message)
    if len(message) > _DETAILS_LIMIT:
        message = message[:_DETAILS_LIMIT] + " ..."
    return message


def _request_strings(request, depth: int = 0) -> list[str]:
    out: list[str] = []
    if depth > 3 or not hasattr(request, "ListFields"):
        return out
    try:
        fields = request.ListFields()
    except Exception:
        return out
    for _desc, value in fields:
        values = value if isinstance(value, (list, tuple)) or type(value).__name__.startswith("Repeated") else [value]
        for v in values:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, bytes):
                continue
            else:
                out.extend(_request_strings(v, depth + 1))
    return out


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code for an exception raised inside a service, or None if unexpected."""
    if is_disk_full(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, (
            "the server's disk is full; nothing was stored (the model owner "
            "must free space under the data directory), then try again"
        )
    if isinstance(exc, ArtifactCorrupt):
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, TooManyStreams):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, HookUnavailable):
        return grpc.StatusCode.FAILED_PRECONDITION, f"{exc}; install that part of Offsite or configure another hook"
    if isinstance(exc, (NotFound, ArtifactNotFound)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, Conflict):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, (InvalidDigest, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return None
