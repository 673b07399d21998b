"""deploy/docker, deploy/compose.yaml and deploy/k8s checked against the code they run.

No container runtime runs on these machines, so the files are checked structurally: every
file parses; images are multi-stage, non-root, on the Makefile's CPU torch pin; every
command's flags exist in the CLI it calls (offsite-admin serve through its Click command,
Flower's SuperLink/SuperExec/SuperNode through their own argparse parsers), so a renamed
flag fails here; ports, env names, node-config keys and secret files match the code; the
healthcheck module the images and probes call really answers gRPC health.
"""

from __future__ import annotations

import re
import shlex

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))


# ---- what the code accepts ---------------------------------------------------------------------
def _serve_command():
    import typer

    from offsite.server.cli.main import app

    return typer.main.get_command(app).commands["serve"]


def _flower_parser(name: str):
    if name == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as make
    elif name == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as make
    elif name == "flower-superexec":
        from flwr.supercore.cli.flower_superexec import _parse_args as make
    else:
        raise KeyError(name)
    return make()


def accepted_flags(program: str) -> set[str]:
    """The option strings `program` accepts (a subcommand after `offsite-admin`)."""
    if program == "offsite-admin serve":
        return {o for p in _serve_command().params for o in p.opts}
    if program in ("healthcheck", "offsite.server.healthcheck"):  # what the probes run
        from offsite.server.healthcheck import parser

        return {o for a in parser()._actions for o in a.option_strings}
    if program == "offsite.server.fleet_proxy":
        from offsite.server.fleet_proxy import parser as proxy_parser

        return {o for a in proxy_parser()._actions for o in a.option_strings}
    return {o for a in _flower_parser(program)._actions for o in a.option_strings}


def unknown_flags(program: str, argv: list[str]) -> list[str]:
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("-")]
    known = accepted_flags(program)
    return [f for f in flags if f not in known]


def test_a_renamed_flag_is_caught():
    # The check every file goes through: a flag the CLI does not have is reported by name.
    good = ["serve", "--data-dir", "/data", "--port", "50051"]
    assert unknown_flags("offsite-admin serve", good) == []
    assert unknown_flags("offsite-admin serve", ["serve", "--datadir", "/data"]) == ["--datadir"]
    assert unknown_flags("flower-superlink", ["--enable-supernode-authentication"]) == [
        "--enable-supernode-authentication"
    ]


def _program(entry: list[str]) -> str:
    if entry[:2] == ["python", "-m"]:
        return entry[2]
    exe = Path(entry[0]).name
    return "offsite-admin serve" if exe == "offsite-admin" else exe


def _flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ---- Dockerfiles ------------------------------------------------------------------------------
def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _exec_form(rest: str) -> list[str]:
    import json

    return json.loads(rest)


def _torch_pin() -> str:
    return re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_nonroot_cpu_torch(path):
    instrs = parse_dockerfile(path)
    froms = [r for i, r in instrs if i == "FROM"]
    assert len(froms) >= 2 and " AS " in froms[0].upper(), "multi-stage: a build stage, then the runtime"
    final = instrs[max(n for n, (i, _) in enumerate(instrs) if i == "FROM") :]
    assert any(i == "COPY" and r.startswith("--from=build") for i, r in final)
    users = [r for i, r in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(r for i, r in instrs if i == "RUN")
    assert f"torch=={_torch_pin()}" in runs and "download.pytorch.org/whl/cpu" in runs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for extra in re.findall(r'pip install "\.\[(\w+)\]"', runs):
        assert extra in pyproject["project"]["optional-dependencies"]
    for i, r in instrs:
        if i == "COPY" and not r.startswith("--from"):
            for src in r.split()[:-1]:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src}: no such path in the repository"
    packages = {p.split(".")[1] if p.count(".") else p for p in pyproject["tool"]["setuptools"]["packages"]}
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {r.split()[0] for i, r in instrs if i == "COPY" and not r.startswith("--from")}
    assert package_dirs <= copied, f"every package directory goes into the image: missing {package_dirs - copied}"
    assert packages


def test_server_image_runs_serve_with_real_flags_and_healthcheck():
    instrs = dict(parse_dockerfile(DEPLOY / "docker" / "server.Dockerfile"))
    entry, cmd = _exec_form(instrs["ENTRYPOINT"]), _exec_form(instrs["CMD"])
    assert entry == ["offsite-admin"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "offsite-admin" in scripts and "offsite-client" in scripts
    assert cmd[0] == "serve" and unknown_flags("offsite-admin serve", cmd) == []
    port = {p.name: p.default for p in _serve_command().params}["port"]
    assert instrs["EXPOSE"] == str(port) and _flag_value(cmd, "--port") == str(port)
    health = _exec_form(instrs["HEALTHCHECK"].split("CMD", 1)[1].strip())
    assert health[:3] == ["python", "-m", "offsite.server.healthcheck"] and health[3].endswith(f":{port}")
    assert unknown_flags("healthcheck", health[4:]) == []


def test_client_image_runs_offsite_client():
    instrs = dict(parse_dockerfile(DEPLOY / "docker" / "client.Dockerfile"))
    assert _exec_form(instrs["ENTRYPOINT"]) == ["offsite-client"]
    env = instrs["ENV"]
    for name in ("OFFSITE_CLIENT_HOME", "OFFSITE_CACHE"):  # the names client/fetch.py reads
        assert name in env and name in (ROOT / "client" / "fetch.py").read_text()


# ---- compose ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _argv(service: dict) -> tuple[str, list[str]]:
    entry = service["entrypoint"]
    if entry[0] == "sh":  # a wrapper that reads a secret file: sh -c '... exec PROGRAM "$@"' PROGRAM
        program = re.search(r'exec (\S+) "\$\$@"', entry[2]).group(1)
        assert entry[3] == program
        entry = [program]
    return _program(entry), [str(a) for a in service["command"]]


def test_compose_services_and_only_public_ports(compose):
    services = compose["services"]
    assert {"postgres", "server", "superlink", "superexec", "supernode-1", "supernode-2", "supernode-3"} <= set(
        services
    )
    from offsite.server.federation.deployment import superlink_command

    serve_port = {p.name: p.default for p in _serve_command().params}["port"]
    superlink_port = int(_flag_value(superlink_command(Path("/s"), _tls(), Path("/x")), "--port"))
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    # Data owners get the API and the Fleet proxy; the SuperLink's own port carries the Control API.
    assert published == {
        "server": [f"{serve_port}:{serve_port}"],
        "fleet-proxy": [f"{superlink_port}:{superlink_port}"],
    }
    assert compose["networks"]["internal"]["internal"] is True
    for name in ("postgres", "superexec", "superlink"):
        assert services[name]["networks"] == ["internal"], name
    for name in ("supernode-1", "supernode-2", "supernode-3"):
        assert services[name]["networks"] == ["federation"]


def _tls():
    from offsite.server.federation.deployment import TlsFiles

    return TlsFiles(Path("/ca.pem"), Path("/c.pem"), Path("/c.key"))


def test_compose_commands_use_real_flags(compose):
    for name, service in compose["services"].items():
        if "entrypoint" not in service:
            continue
        program, argv = _argv(service)
        assert unknown_flags(program, argv) == [], f"{name}: {program} has no {unknown_flags(program, argv)}"


def test_compose_superlink_matches_the_code_topology(compose):
    from offsite.server.federation.deployment import superlink_command

    ours = [a for a in superlink_command(Path("/s"), _tls(), Path("/x")) if a.startswith("--")]
    _, argv = _argv(compose["services"]["superlink"])
    assert set(ours) <= {a for a in argv if a.startswith("--")}, "compose drops a SuperLink flag the code sets"
    assert _flag_value(argv, "--isolation") == "process"


def test_compose_wiring_superlink_proxy_superexec_supernodes(compose):
    services = compose["services"]
    _, superlink = _argv(services["superlink"])
    _, proxy = _argv(services["fleet-proxy"])
    _, superexec = _argv(services["superexec"])
    private = f"superlink:{_flag_value(superlink, '--port')}"
    assert _flag_value(proxy, "--upstream") == private and _flag_value(superexec, "--runtime-api-address") == private
    public = f"fleet-proxy:{_flag_value(proxy, '--listen').rsplit(':', 1)[1]}"
    for n in (1, 2, 3):
        assert _flag_value(_argv(services[f"supernode-{n}"])[1], "--superlink") == public
    flwr_config = tomllib.loads((DEPLOY / "flwr-config.toml").read_text())
    assert flwr_config["superlink"]["offsite"]["address"] == private


def test_compose_env_names_match_the_code(compose):
    serve = {p.name: p for p in _serve_command().params}
    assert serve["database_url"].envvar == "OFFSITE_DATABASE_URL"
    assert "OFFSITE_DATABASE_URL=" in compose["services"]["server"]["entrypoint"][2]
    superexec = compose["services"]["superexec"]
    assert "PGPASSWORD=" in superexec["entrypoint"][2] and "db-password" in superexec["secrets"]
    health = superexec["healthcheck"]["test"]
    assert health[-1] == _flag_value([str(a) for a in superexec["command"]], "--health-server-address")


def test_compose_node_config_keys_are_what_the_clientapp_reads(compose):
    from dataclasses import fields

    from offsite.client.flower_app import ClientSettings

    readable = {f.name.replace("_", "-") for f in fields(ClientSettings)} | {"job-id", "partition-id"}
    for n in (1, 2, 3):
        _, argv = _argv(compose["services"][f"supernode-{n}"])
        config = _flag_value(argv, "--node-config")
        keys = {part.split("=", 1)[0] for part in shlex.split(config)}
        assert keys <= readable, keys - readable
        assert {"data", "public-key", "bundle-cache"} <= keys


def test_every_compose_secret_is_made_by_make_secrets(compose, tmp_path):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("make_secrets", DEPLOY / "make_secrets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = module.generate(tmp_path / "secrets", owners=3)
    for name, secret in compose["secrets"].items():
        assert (out / Path(secret["file"]).name).is_file(), name
    used = set()
    for service in compose["services"].values():
        for s in service.get("secrets", []):
            used.add(s if isinstance(s, str) else s["source"])
    assert used <= set(compose["secrets"])
    assert (out / "database-url").read_text().startswith("postgresql+psycopg://")
    assert oct((out / "signing.key").stat().st_mode & 0o777) == "0o600"
    from offsite.server.registry import _redacted

    assert (out / "db-password").read_text() not in _redacted((out / "database-url").read_text())


# ---- Kubernetes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifests():
    docs = []
    for path in K8S:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _containers(manifests):
    for d in manifests:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d, c


def test_manifests_parse_and_name_everything(manifests):
    kinds = {d["kind"] for d in manifests}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy", "Secret", "ConfigMap"} <= kinds
    for d in manifests:
        assert d["apiVersion"] and d["metadata"]["name"]


def test_k8s_commands_use_real_flags_and_nonroot(manifests):
    for dep, c in _containers(manifests):
        program = _program(c["command"])
        argv = [str(a) for a in c["args"]]
        assert unknown_flags(program, argv) == [], (c["name"], unknown_flags(program, argv))
        sc = dep["spec"]["template"]["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0


def test_k8s_probes_are_grpc_health(manifests):
    probes = 0
    for _, c in _containers(manifests):
        argv = [str(a) for a in c["args"]]
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if not probe:
                continue
            probes += 1
            if "tcpSocket" in probe:  # the Fleet proxy: plain HTTPS, no health service
                assert _flag_value(argv, "--listen").endswith(f":{probe['tcpSocket']['port']}")
            elif "grpc" in probe:  # the kubelet's own gRPC probe: the plaintext health server's port
                assert _flag_value(argv, "--health-server-address").endswith(f":{probe['grpc']['port']}")
                assert _flag_value(argv, "--health-server-address").startswith("0.0.0.0:")
            else:
                cmd = probe["exec"]["command"]
                assert cmd[:3] == ["python", "-m", "offsite.server.healthcheck"]
                assert (
                    cmd[3].endswith(":" + _flag_value(argv, "--port")) and unknown_flags("healthcheck", cmd[4:]) == []
                )
    assert probes >= 4


def test_k8s_secrets_and_env_refer_to_what_exists(manifests):
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) for d in manifests if d["kind"] == "Secret"}
    assert all(v == "" for d in manifests if d["kind"] == "Secret" for v in d["stringData"].values()), "no real secrets"
    for dep, c in _containers(manifests):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]
        for vol in dep["spec"]["template"]["spec"]["volumes"]:
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets
    server = next(c for _, c in _containers(manifests) if c["name"] == "server")
    assert {e["name"] for e in server["env"]} == {"OFFSITE_DATABASE_URL"}


def test_networkpolicy_opens_only_the_fleet_and_api_ports(manifests):
    policies = {d["metadata"]["name"]: d["spec"] for d in manifests if d["kind"] == "NetworkPolicy"}
    deny = policies["offsite-default-deny"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    open_ports = {p["port"] for rule in policies["offsite-data-owners"]["ingress"] for p in rule["ports"]}
    serve_port = {p.name: p.default for p in _serve_command().params}["port"]
    from offsite.server.federation.deployment import superlink_command

    superlink_port = int(_flag_value(superlink_command(Path("/s"), _tls(), Path("/x")), "--port"))
    assert open_ports == {serve_port, superlink_port}
    metrics = policies["offsite-metrics"]["ingress"][0]
    server = next(c for _, c in _containers(manifests) if c["name"] == "server")
    metrics_port = int(_flag_value([str(a) for a in server["args"]], "--metrics-address").rsplit(":", 1)[1])
    assert [p["port"] for p in metrics["ports"]] == [metrics_port] and "namespaceSelector" in metrics["from"][0]
    superlink = next(c for _, c in _containers(manifests) if c["name"] == "superlink")
    private = policies["offsite-superlink-private"]["ingress"][0]
    assert [p["port"] for p in private["ports"]] == [int(_flag_value([str(a) for a in superlink["args"]], "--port"))]
    assert private["from"][0]["podSelector"]["matchLabels"]["app"] == "offsite-server"
    pg = policies["offsite-postgres"]["ingress"]
    assert [r["from"][0]["podSelector"]["matchLabels"]["app"] for r in pg] == ["offsite-server"]


# ---- the healthcheck the images and probes run --------------------------------------------------------
def test_healthcheck_module_answers_from_a_real_server(tmp_path):
    from offsite.server.app import ServerThread
    from offsite.server.healthcheck import main
    from offsite.server.state import ServerConfig
    from offsite.server.testing import tiny_bundle

    server = ServerThread(
        ServerConfig(data_dir=tmp_path / "srv", port=0, signing_key=tiny_bundle().signing_key)
    ).start()
    address = server.address
    try:
        assert main([address]) == 0
        assert main([address, "--service", "offsite.v1.NoSuchService"]) == 1
    finally:
        server.stop()
    assert main([address, "--timeout", "1"]) == 1  # stopped: unhealthy


def test_superlink_tls_files_chain_to_their_ca_and_are_kept_on_a_second_call(tmp_path):
    from cryptography import x509

    from offsite.server.federation.deployment import make_tls

    files = make_tls(tmp_path / "tls", hosts=("127.0.0.1", "superlink.local"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.local"]
    assert files.server_key.stat().st_mode & 0o777 == 0o600
    before = files.server_cert.read_bytes()
    assert make_tls(tmp_path / "tls").server_cert.read_bytes() == before
