"""`offsite-admin tokens ...` and `offsite-admin audit`: API tokens and the audit log."""

from __future__ import annotations

from pathlib import Path

import typer

from offsite.protos.v1 import admin_pb2, admin_pb2_grpc

from .remote import CONNECTION, JsonOption, call, console, emit_json, fail, fmt_time, table, to_dict

app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API tokens (admin only).")


def _stub() -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(CONNECTION.channel())


@app.command("create")
def create(
    role: str = typer.Option(..., "--role", help="admin | partner | data-owner"),
    name: str = typer.Option(..., "--name", help="who holds it; for a data owner, its name in jobs"),
    job: list[str] = typer.Option([], "--job", help="data owners: a job this token may enroll in (repeatable)"),
    ttl: int = typer.Option(0, "--ttl", help="seconds until it expires (0 = never)"),
    json_out: bool = JsonOption,
) -> None:
    """Create a token; the secret is printed once.

    Example: offsite-admin tokens create --role data-owner --name alice --job job_1a2b3c
    """
    resp = call(
        _stub().CreateToken,
        admin_pb2.CreateTokenRequest(name=name, role=role, jobs=job, ttl_seconds=ttl),
        json_out=json_out,
    )
    if json_out:
        emit_json({"token": to_dict(resp.token), "secret": resp.secret})
        return
    console.print(f"token [bold]{resp.token.id}[/bold] for {name} ({role}); the secret, shown only now:")
    print(resp.secret)


@app.command("list")
def list_(
    all_: bool = typer.Option(False, "--all", help="include revoked tokens"), json_out: bool = JsonOption
) -> None:
    """List tokens (never their secrets).

    Example: offsite-admin tokens list --json
    """
    resp = call(_stub().ListTokens, admin_pb2.ListTokensRequest(include_revoked=all_), json_out=json_out)
    if json_out:
        emit_json([to_dict(t) for t in resp.tokens])
        return
    table(
        "tokens",
        ["id", "name", "role", "jobs", "created", "expires", "revoked"],
        [
            (
                t.id,
                t.name,
                t.role,
                ",".join(t.jobs),
                fmt_time(t.created_at),
                fmt_time(t.expires_at),
                fmt_time(t.revoked_at),
            )
            for t in resp.tokens
        ],
    )


@app.command("revoke")
def revoke(token_id: str = typer.Argument(..., help="token id (tok_...)"), json_out: bool = JsonOption) -> None:
    """Revoke a token at once.

    Example: offsite-admin tokens revoke tok_1a2b3c4d5e6f
    """
    resp = call(_stub().RevokeToken, admin_pb2.RevokeTokenRequest(id=token_id), json_out=json_out)
    if json_out:
        emit_json(to_dict(resp))
    else:
        console.print(f"revoked {resp.id} ({resp.name}, {resp.role})")


@app.command("rotate")
def rotate(
    token_id: str = typer.Argument(..., help="token id (tok_...)"),
    ttl: int = typer.Option(0, "--ttl", help="seconds until the new token expires (0 = the old token's lifetime)"),
    json_out: bool = JsonOption,
) -> None:
    """Give a token a new secret: same name, role and jobs, its enrollments carried over, the
    old secret revoked at once. The new secret is printed once.

    Example: offsite-admin tokens rotate tok_1a2b3c4d5e6f --ttl 2592000
    """
    resp = call(_stub().RotateToken, admin_pb2.RotateTokenRequest(id=token_id, ttl_seconds=ttl), json_out=json_out)
    if json_out:
        emit_json({"token": to_dict(resp.token), "secret": resp.secret, "revoked": token_id})
        return
    console.print(
        f"token [bold]{resp.token.id}[/bold] replaces {token_id} for {resp.token.name} ({resp.token.role}); "
        "the secret, shown only now:"
    )
    print(resp.secret)


@app.command("rotate-admin")
def rotate_admin(
    data_dir: Path = typer.Option(..., "--data-dir", help="the server's data dir (admin.token lives here)"),
    ttl: int = typer.Option(90 * 24 * 3600, "--ttl", help="seconds until the new admin token expires (0 = never)"),
    database_url: str = typer.Option(
        None, "--database-url", envvar="OFFSITE_DATABASE_URL", help="SQLAlchemy URL (default: sqlite in DATA_DIR)"
    ),
    json_out: bool = JsonOption,
) -> None:
    """Replace DATA_DIR/admin.token with a new admin token and revoke the old one (runs on the
    server's machine, with or without the server running).

    Example: offsite-admin tokens rotate-admin --data-dir srv --ttl 2592000
    """
    from ..auth import Authenticator
    from ..registry import Registry
    from ..state import rotate_admin_token

    if not (data_dir / "registry.db").is_file() and not database_url:
        fail(f"{data_dir}: no registry.db; pass the server's --data-dir", json_out)
    registry = Registry(database_url or f"sqlite:///{data_dir.resolve() / 'registry.db'}")
    try:
        path, token_id = rotate_admin_token(data_dir, registry, Authenticator(registry), ttl)
    except ValueError as e:
        fail(str(e), json_out)
    finally:
        registry.close()
    if json_out:
        emit_json({"token_id": token_id, "path": str(path), "ttl_seconds": ttl})
    else:
        console.print(f"new admin token {token_id} written to {path} (mode 600); the previous one is revoked")


def audit(
    limit: int = typer.Option(50, "--limit", help="most recent entries to show"),
    method: str = typer.Option("", "--method", help="only methods containing this text"),
    json_out: bool = JsonOption,
) -> None:
    """Show the audit log: every mutating call and every refused one (admin only).

    Example: offsite-admin audit --method Release --limit 20
    """
    resp = call(_stub().ListAudit, admin_pb2.ListAuditRequest(limit=limit, method=method), json_out=json_out)
    if json_out:
        emit_json([to_dict(e) for e in resp.entries])
        return
    table(
        "audit entries",
        ["id", "at", "actor", "role", "method", "target", "outcome", "detail"],
        [
            (e.id, fmt_time(e.at), e.actor, e.role, e.method.rsplit(".", 1)[-1], e.target, e.outcome, e.detail)
            for e in resp.entries
        ],
    )


def whoami(json_out: bool = JsonOption) -> None:
    """Show who the token belongs to and its role.

    Example: OFFSITE_TOKEN=$(cat srv/admin.token) offsite-admin whoami
    """
    resp = call(admin_pb2_grpc.IdentityStub(CONNECTION.channel()).WhoAmI, admin_pb2.WhoAmIRequest(), json_out=json_out)
    if json_out:
        emit_json(to_dict(resp))
    else:
        console.print(
            f"{resp.name} ({resp.role}), token {resp.token_id}"
            + (f", jobs {', '.join(resp.jobs)}" if resp.jobs else "")
        )
