"""Opening a channel to an Offsite server, shared by `offsite-admin` and `offsite-client`.

Adds the bearer token to every call, turns TLS on when a CA is given (mutual TLS when a
client certificate is given too), and sets the message size limits the server uses.
It lives beside the stubs because both sides need it and the client never imports the server.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # chunks are at most 4 MiB; room for framing
DEFAULT_ADDRESS = "127.0.0.1:50051"
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
]


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        metadata = list(d.metadata or []) + [self._md]
        return d._replace(metadata=metadata) if hasattr(d, "_replace") else _Details(d, metadata)

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)

    def intercept_stream_stream(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata) -> None:
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


def _credentials(ca: str | Path | None, client_cert: str | Path | None, client_key: str | Path | None):
    if ca is None:
        if client_cert or client_key:
            raise ValueError("a client certificate needs --ca too (mutual TLS runs over TLS)")
        return None
    if bool(client_cert) != bool(client_key):
        raise ValueError("pass both --client-cert and --client-key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
    )


def open_channel(
    address: str | None = None,
    token: str | None = None,
    ca: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
) -> grpc.Channel:
    """A blocking channel; defaults come from OFFSITE_SERVER, OFFSITE_TOKEN, OFFSITE_CA."""
    address = address or os.environ.get("OFFSITE_SERVER") or DEFAULT_ADDRESS
    token = token or os.environ.get("OFFSITE_TOKEN")
    ca = ca or os.environ.get("OFFSITE_CA") or None
    creds = _credentials(ca, client_cert, client_key)
    channel = (
        grpc.secure_channel(address, creds, options=_OPTIONS)
        if creds is not None
        else grpc.insecure_channel(address, options=_OPTIONS)
    )
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


def open_aio_channel(
    address: str,
    token: str | None = None,
    ca: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
):
    """An asyncio channel (benchmarks, async clients); the token goes in per-call metadata."""
    creds = _credentials(ca, client_cert, client_key)
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options=_OPTIONS)
    return grpc.aio.insecure_channel(address, options=_OPTIONS)


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
