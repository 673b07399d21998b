"""`python -m offsite.server.healthcheck HOST:PORT [--ca CA.pem]`: gRPC health of the server.

Exit 0 when grpc.health.v1 answers SERVING for the whole server (service ""), 1 otherwise,
with one line saying what it saw. Containers use it as their healthcheck and Kubernetes as
an exec probe: unlike Kubernetes' built-in gRPC probe it speaks TLS (the server's port
carries TLS whenever --tls-cert is set).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    address: str, ca: str | None = None, timeout: float = 3.0, service: str = "", server_name: str = ""
) -> tuple[bool, str]:
    if ca:
        with open(ca, "rb") as fh:
            creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
        # Probing 127.0.0.1 inside a container: check the certificate against the name it was issued for.
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError as e:
        return False, f"{address}: {e.code().name} {e.details() or ''}".strip()
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m offsite.server.healthcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("address", nargs="?", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    ap.add_argument("--ca", help="CA certificate (PEM): connect with TLS")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--server-name", default="", help="the name the TLS certificate was issued for (with --ca)")
    ap.add_argument("--service", default="", help="one service's health instead of the server's")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ok, line = check(args.address, args.ca, args.timeout, args.service, args.server_name)
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
