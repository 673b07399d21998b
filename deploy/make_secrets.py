"""Generate the secrets deploy/compose.yaml and deploy/k8s mount, as files (never committed).

    python deploy/make_secrets.py --out deploy/secrets [--owners 3] [--host models.example.org]

Writes into --out (mode 600 for private material):

| file | what |
|---|---|
| ca.pem | a private CA (ECDSA P-384) |
| server.pem/.key, superlink.pem/.key | one certificate from that CA for the API and the SuperLink: offsite-server, server, superlink, offsite-superlink, fleet-proxy, localhost, 127.0.0.1 and --host |
| superexec.secret | 32 random bytes shared by the SuperLink and its SuperExec |
| signing.key, signing.pub | the model owner's bundle signing key |
| node-i.key, node-i.pub | each SuperNode's ECDSA P-384 OpenSSH key (register the .pub at the SuperLink) |
| db-password, database-url | PostgreSQL's password, and the server's --database-url using it |

Existing files are kept, so running it again only fills in what is missing.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
from pathlib import Path

SERVER_NAMES = ("offsite-server", "server", "localhost", "127.0.0.1")
SUPERLINK_NAMES = ("superlink", "offsite-superlink", "fleet-proxy", "localhost", "127.0.0.1")
DB_USER, DB_NAME, DB_HOST = "offsite", "offsite", "postgres"


def _write(path: Path, data: bytes, mode: int) -> None:
    if path.exists():
        return
    from offsite.files import atomic_write

    atomic_write(path, data, mode)


def generate(out: str | Path, owners: int = 3, host: str = "") -> Path:
    from offsite.client.cli_join import generate_node_key
    from offsite.emulators.signing import generate_signing_key
    from offsite.server.federation.deployment import make_secret, make_tls

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = (host,) if host else ()
    # One certificate names both services of the model owner (make_tls keeps no CA key to sign a second).
    if not (out / "ca.pem").exists():
        with tempfile.TemporaryDirectory() as tmp:
            tls = make_tls(Path(tmp), hosts=(*SERVER_NAMES, *SUPERLINK_NAMES[:3], *extra))
            _write(out / "ca.pem", tls.ca_cert.read_bytes(), 0o644)
            for name in ("server", "superlink"):
                _write(out / f"{name}.pem", tls.server_cert.read_bytes(), 0o644)
                _write(out / f"{name}.key", tls.server_key.read_bytes(), 0o600)
    make_secret(out / "superexec.secret")
    if not (out / "signing.key").exists():
        key, pub = generate_signing_key(Path(tempfile.mkdtemp()))
        _write(out / "signing.key", key.read_bytes(), 0o600)
        _write(out / "signing.pub", pub.read_bytes(), 0o644)
        shutil.rmtree(key.parent, ignore_errors=True)
    for i in range(1, owners + 1):
        if not (out / f"node-{i}.key").exists():
            with tempfile.TemporaryDirectory() as tmp:
                key, pub = generate_node_key(tmp)
                _write(out / f"node-{i}.key", key.read_bytes(), 0o600)
                _write(out / f"node-{i}.pub", pub.read_bytes(), 0o644)
    if not (out / "db-password").exists():
        password = secrets.token_urlsafe(24)
        _write(out / "db-password", password.encode(), 0o600)
        url = f"postgresql+psycopg://{DB_USER}:{password}@{DB_HOST}:5432/{DB_NAME}"
        _write(out / "database-url", url.encode(), 0o600)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "secrets"))
    ap.add_argument("--owners", type=int, default=3)
    ap.add_argument(
        "--host", default="", help="the public name or address data owners use (added to both certificates)"
    )
    args = ap.parse_args()
    os.umask(0o077)
    out = generate(args.out, args.owners, args.host)
    print(f"secrets in {out}: " + " ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))


if __name__ == "__main__":
    main()
