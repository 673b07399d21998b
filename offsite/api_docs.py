"""Write docs/partner-api.md from the `offsite.v1` protos' own comments, with one
grpcurl-style example per service (checked against the request message when generated).

    python -m offsite.api_docs            # rewrite docs/partner-api.md
    python -m offsite.api_docs --check    # exit 1 when the page is stale (what the test runs)
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.json_format import ParseDict

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "offsite" / "v1"
DOC = ROOT / "docs" / "partner-api.md"

# One example call per service: (file stem, method, request as JSON). Generating the page
# parses each request into its message, so an example that no longer fits the proto fails.
EXAMPLES = {
    "Models": ("models", "ListModels", {"limit": 10}),
    "Emulators": ("models", "BuildEmulator", {"model": "smollm2", "config": {"quantize": "int4", "awq": True}}),
    "Artifacts": ("artifacts", "StatArtifact", {"sha256": "<64 hex characters>"}),
    "Jobs": (
        "jobs",
        "CreateJob",
        {
            "name": "pilot",
            "spec": {"emulator_id": "emu_1a2b3c4d5e6f", "rounds": 3, "min_clients": 2, "train_config": {"steps": 20}},
        },
    ),
    "Releases": ("releases", "ListReleases", {"status": "pending-gate"}),
    "Evals": ("evals", "RunEval", {"candidate": "rel_1a2b3c4d5e6f", "limit": 20}),
    "Operations": ("operations", "WatchOperation", {"id": "op_1a2b3c4d5e6f"}),
    "Admin": ("admin", "CreateToken", {"name": "alice", "role": "data-owner", "jobs": ["job_1a2b3c4d5e6f"]}),
    "Identity": ("admin", "WhoAmI", {}),
}
PLACEHOLDER_SHA = "0" * 64


@dataclass
class Rpc:
    name: str
    request: str
    response: str
    client_stream: bool
    server_stream: bool
    doc: str


@dataclass
class Message:
    name: str
    doc: str
    fields: list[tuple[str, str, str]] = field(default_factory=list)  # (type, name, comment)
    enum: bool = False


@dataclass
class ProtoFile:
    stem: str
    doc: str
    services: dict[str, tuple[str, list[Rpc]]] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)


def _comment(lines: list[str]) -> str:
    return " ".join(line.strip()[2:].strip() for line in lines).strip()


def parse(path: Path) -> ProtoFile:
    """A small reader for the subset of proto3 these files use (one declaration per line)."""
    text = path.read_text().splitlines()
    header = []
    for line in text:
        if not line.startswith("//"):
            break
        header.append(line)
    pf = ProtoFile(path.stem, _comment(header).replace(" //", "\n\n").replace("  ", " "))
    pending: list[str] = []
    current: Message | None = None
    service: str | None = None
    for raw in text[len(header) :]:
        line = raw.strip()
        trailing = raw.split("//", 1)[1].strip() if "//" in raw and not line.startswith("//") else ""
        code = raw.split("//", 1)[0].strip()
        if line.startswith("//"):
            pending.append(line)
            continue
        if m := re.match(r"(message|enum) (\w+) \{(.*)\}$", code):  # one-line message
            msg = Message(m.group(2), _comment(pending), enum=m.group(1) == "enum")
            for f in filter(None, (s.strip() for s in m.group(3).split(";"))):
                parts = f.split("=")[0].split()
                msg.fields.append((" ".join(parts[:-1]), parts[-1], trailing))
            pf.messages.append(msg)
        elif m := re.match(r"(message|enum) (\w+) \{$", code):
            current = Message(m.group(2), _comment(pending), enum=m.group(1) == "enum")
        elif m := re.match(r"service (\w+) \{$", code):
            service = m.group(1)
            pf.services[service] = (_comment(pending), [])
        elif m := re.match(r"rpc (\w+)\((stream )?([\w.]+)\) returns \((stream )?([\w.]+)\);", code):
            doc = " ".join(filter(None, [_comment(pending), trailing]))
            pf.services[service][1].append(
                Rpc(m.group(1), m.group(3), m.group(5), bool(m.group(2)), bool(m.group(4)), doc)
            )
        elif code == "}":
            if current is not None:
                pf.messages.append(current)
            current, service = None, None
        elif current is not None and "=" in code:
            parts = code.split("=")[0].split()
            current.fields.append(
                (" ".join(parts[:-1]), parts[-1], " ".join(filter(None, [_comment(pending), trailing])))
            )
        pending = []
    return pf


def _example(service: str, pf: ProtoFile) -> list[str]:
    stem, method, request = EXAMPLES[service]
    rpc = next(r for r in pf.services[service][1] if r.name == method)
    module = importlib.import_module(f"offsite.protos.v1.{stem}_pb2")
    checked = json.loads(json.dumps(request).replace("<64 hex characters>", PLACEHOLDER_SHA))
    ParseDict(checked, getattr(module, rpc.request)())  # raises when the example no longer fits
    return [
        "```bash",
        'grpcurl -cacert ca.pem -H "authorization: Bearer $OFFSITE_TOKEN" \\',
        f"    -d '{json.dumps(request)}' \\",
        f"    models.example.org:50051 offsite.v1.{service}/{method}",
        "```",
        "",
    ]


def render() -> str:
    files = [parse(p) for p in sorted(PROTO_DIR.glob("*.proto"))]
    common = next(f for f in files if f.stem == "common")
    out = [
        "# Partner API (`offsite.v1`)",
        "",
        "Generated from the comments in `protos/offsite/v1/*.proto` by `python -m offsite.api_docs`",
        "(`make docs`); a test fails when this page and the protos disagree.",
        "",
        common.doc,
        "",
        "Connect with any gRPC client. The server has reflection and health checking on, so",
        "[grpcurl](https://github.com/fullstorydev/grpcurl) needs no proto files; drop `-cacert ca.pem`",
        "and add `-plaintext` for a server started without TLS. Python clients use the committed",
        "stubs: `offsite.protos.v1.<file>_pb2[_grpc]`, and `offsite.protos.channel.open_channel`.",
        "Errors are standard status codes whose message says what to do (`INVALID_ARGUMENT`,",
        "`NOT_FOUND`, `FAILED_PRECONDITION`, `PERMISSION_DENIED`, `UNAUTHENTICATED`,",
        "`RESOURCE_EXHAUSTED` above the 8 MiB message limit).",
        "",
    ]
    out += ["| service | file | what |", "|---|---|---|"]
    for pf in files:
        for name, (doc, _) in pf.services.items():
            what = (doc or pf.doc.splitlines()[0]).replace("|", "\\|")
            out.append(f"| [`{name}`](#{name.lower()}) | `{pf.stem}.proto` | {what} |")
    out.append("")
    for pf in files:
        out += [f"## `{pf.stem}.proto`", "", pf.doc, ""]
        for name, (doc, rpcs) in pf.services.items():
            out += [f"### {name}", ""]
            if doc:
                out += [doc, ""]
            out += ["| method | request | response | notes |", "|---|---|---|---|"]
            for r in rpcs:
                req = ("stream " if r.client_stream else "") + f"`{r.request}`"
                resp = ("stream " if r.server_stream else "") + f"`{r.response}`"
                notes = r.doc.replace("|", "\\|")
                out.append(f"| `{r.name}` | {req} | {resp} | {notes} |")
            out.append("")
            out += _example(name, pf)
        if pf.messages:
            out += ["Messages:", ""]
            for msg in pf.messages:
                kind = "enum" if msg.enum else "message"
                out += [f"- **{msg.name}** ({kind})" + (f": {msg.doc}" if msg.doc else "")]
                for typ, fname, comment in msg.fields:
                    out.append(f"  - `{fname}`" + (f" `{typ}`" if typ else "") + (f": {comment}" if comment else ""))
            out.append("")
    while out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the page differs from the protos")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run `python -m offsite.api_docs`", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
