"""`offsite-client join`: run this data owner's Flower SuperNode for a job.

The node authenticates to the SuperLink with its own ECDSA P-384 key (created on first
use; the model owner registers the public half with `flwr supernode register`), verifies
the SuperLink's TLS certificate against the CA it was given, and trains on local data
only. Its ClientApp reads the bundle from the local cache by the artifact's sha256
(`offsite-client fetch` put it there), so nothing but adapters and metrics leave the
machine. Telemetry and update checks are off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer

from offsite.cli import JsonOption, err_console
from offsite.files import atomic_write

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def generate_node_key(directory: str | Path) -> tuple[Path, Path]:
    """DIR/node.key (OpenSSH private, mode 600) and DIR/node.pub: ECDSA P-384, as Flower wants."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory)
    key_path, pub_path = d / "node.key", d / "node.pub"
    if key_path.exists() and pub_path.exists():
        return key_path, pub_path
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for path, data, mode in ((key_path, private, 0o600), (pub_path, public + b"\n", 0o644)):
        atomic_write(path, data, mode)
    return key_path, pub_path


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "") + "'"


def supernode_command(
    superlink: str, root_cert: str | Path, node_key: str | Path, node_config: dict[str, str], port: int = 9094
) -> list[str]:
    """The flower-supernode command line (TLS to the SuperLink, node authentication)."""
    exe = Path(sys.executable).parent / "flower-supernode"
    config = " ".join(f"{k}={_quote(v)}" for k, v in node_config.items())
    return [
        str(exe) if exe.exists() else "flower-supernode",
        "--superlink",
        superlink,
        "--root-certificates",
        str(root_cert),
        "--auth-supernode-private-key",
        str(node_key),
        "--node-config",
        config,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),  # the node's local runtime API stays on loopback
    ]


def join(
    job: str = typer.Option(..., "--job", help="the job id you enrolled in (`offsite-client enroll`)"),
    data: str = typer.Option(
        ..., "--data", help="your training data: JSONL/text file or directory (never leaves this machine)"
    ),
    superlink: str = typer.Option(
        "", "--superlink", help="SuperLink Fleet address host:port (default: the enrollment's federation address)"
    ),
    root_cert: Path = typer.Option(
        ..., "--root-cert", help="CA certificate that signed the SuperLink's TLS certificate"
    ),
    node_key_dir: Path = typer.Option(
        Path.home() / ".offsite-client" / "node",
        "--node-key-dir",
        help="where this node's key lives (created on first use)",
    ),
    bundle_cache: str = typer.Option(
        "", "--bundle-cache", help="bundle cache (default: where `offsite-client fetch` puts bundles)"
    ),
    public_key: str = typer.Option(
        "", "--public-key", help="the model owner's signing.pub (default: the one saved at enrollment)"
    ),
    port: int = typer.Option(9094, "--port", help="this node's local runtime API port (loopback only)"),
    threads: int = typer.Option(1, "--threads", help="CPU threads for training"),
    print_key: bool = typer.Option(
        False, "--print-key", help="only create/print this node's public key (to send to the model owner) and exit"
    ),
    json_out: bool = JsonOption,
) -> None:
    """Join a federated job as a data owner: start your SuperNode and train when the job runs.

    Example: offsite-client join --job job_1a2b3c4d5e6f --data my.jsonl --root-cert ca.pem
    """
    key_path, pub_path = generate_node_key(node_key_dir)
    if print_key:
        out = {"public_key": str(pub_path), "openssh": pub_path.read_text().strip()}
        typer.echo(
            json.dumps(out) if json_out else f"{out['openssh']}\n(send {pub_path} to the model owner to register)"
        )
        return
    federation_address = ""
    if not (superlink and public_key):
        try:
            from offsite.client.fetch import load_enrollment

            enrollment, _ = load_enrollment(job)
            federation_address, public_key = enrollment.federation_address, public_key or enrollment.public_key_path
        except Exception as e:  # noqa: BLE001 - any lookup failure gets the same instruction
            raise typer.BadParameter(
                f"no --superlink/--public-key and no usable enrollment for {job} ({e}); "
                "run `offsite-client enroll` first or pass both options"
            ) from None
    superlink = superlink or federation_address
    if not superlink:
        raise typer.BadParameter("the enrollment names no federation address; pass --superlink host:port")
    if not Path(data).exists() and not data.startswith("python-reference"):
        raise typer.BadParameter(f"--data {data}: no such file or directory")
    node_config = {"data": data, "public-key": public_key, "threads": str(threads), "job-id": job}
    if bundle_cache:
        node_config["bundle-cache"] = bundle_cache
    cmd = supernode_command(superlink, root_cert, key_path, node_config, port)
    if not json_out:
        err_console.print(f"SuperNode for job {job} -> {superlink} (key {pub_path}); Ctrl-C to leave")
    else:
        typer.echo(json.dumps({"job": job, "superlink": superlink, "public_key": str(pub_path), "command": cmd}))
    env = dict(os.environ, **FLOWER_ENV)
    raise typer.Exit(subprocess.call(cmd, env=env))
