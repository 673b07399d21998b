"""The SuperLink's public face: pass data owners the Fleet API only.

Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS port and asks no
credentials on the Control API, so anyone who can reach that port with the CA can list runs
or submit an app of their own to the model owner's SuperExec. This reverse proxy listens where
data owners connect, forwards ``/v1/fleet/*`` to the SuperLink (bound to a private address)
and answers everything else 403. TLS both ways (uvicorn serves, httpx verifies the SuperLink
against the CA); SuperNode authentication is end to end (signed headers pass through).

    python -m offsite.server.fleet_proxy --listen 0.0.0.0:9092 --upstream 127.0.0.1:9093 \\
        --ca ca.pem --cert superlink.pem --key superlink.key
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the HTTP libraries set themselves.
_DROP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def make_app(upstream: str, ca: str, timeout_s: float = 600.0) -> Starlette:
    # Keep-alive connections expire here before the SuperLink (uvicorn: 5 s) closes them, so a
    # request is never sent on a connection the other side is closing.
    client = httpx.AsyncClient(
        base_url=f"https://{upstream}",
        verify=ssl.create_default_context(cafile=ca),
        timeout=timeout_s,
        limits=httpx.Limits(keepalive_expiry=2.0),
    )

    async def fleet(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        body = await request.body()
        for attempt in (1, 2):
            try:
                reply = await client.request(
                    request.method, request.url.path, params=request.query_params, headers=headers, content=body
                )
                break
            except httpx.RemoteProtocolError:
                # The SuperLink closed a pooled connection as the request went out: it never read
                # it, so sending it once more on a fresh connection is safe.
                if attempt == 2:
                    raise
                log.info("upstream closed a pooled connection; retrying %s once", request.url.path)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP}
        return Response(reply.content, status_code=reply.status_code, headers=out)

    async def refused(request: Request) -> Response:
        log.warning(
            "refused %s %s from %s", request.method, request.url.path, request.client.host if request.client else "?"
        )
        return PlainTextResponse("only the Fleet API is served here\n", status_code=403)

    routes = [
        Route(FLEET_PREFIX + "{rest:path}", fleet, methods=["GET", "POST", "PUT", "DELETE"]),
        Route("/{rest:path}", refused, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"error: {address!r} is not HOST:PORT")
    return host, int(port)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m offsite.server.fleet_proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--listen", required=True, help="HOST:PORT data owners connect to")
    ap.add_argument("--upstream", required=True, help="the SuperLink's private HOST:PORT")
    ap.add_argument("--ca", required=True, help="CA that signed the SuperLink's certificate")
    ap.add_argument("--cert", required=True, help="this proxy's TLS certificate (PEM)")
    ap.add_argument("--key", required=True, help="its private key (PEM)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request is too many
    host, port = _split(args.listen)
    _split(args.upstream)
    uvicorn.run(
        make_app(args.upstream, args.ca),
        host=host,
        port=port,
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
        timeout_graceful_shutdown=5,  # SuperNodes hold keep-alive connections: do not wait on them forever
    )


if __name__ == "__main__":
    main()
