"""Hosts on one machine: Linux network namespaces joined by veth pairs (iproute2, nftables).

One namespace per host. The model owner's host holds a bridge; each other host has one
veth pair whose far end is a port on that bridge, so every packet between two hosts
crosses a veth link (nothing is added to the machine's own namespace):

    [owner-1 10.77.0.11]--veth--+
    [owner-2 10.77.0.12]--veth--+--br0 [model-owner 10.77.0.1]
    [owner-3 10.77.0.13]--veth--+

`Network.firewall` loads an nftables ruleset on the model owner's host: only the listed
ports are open to the other hosts (each rule counts its packets and bytes per source
address, which shows who talked to what), loopback is open, the rest is dropped.
Needs root (CAP_NET_ADMIN) and the `ip` and `nft` tools.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.77.0"


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here; the message says why."""


def _run(*argv: str, input: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def check_available() -> None:
    """Raise NetnsUnavailable naming what is missing (root, ip, nft, kernel support)."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CAP_NET_ADMIN); run as root or in CI")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` is not installed (apt-get install -y {package})")
    probe = f"ofs-probe-{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "exec", probe, "nft", "list", "ruleset")
    except RuntimeError as e:
        raise NetnsUnavailable(f"cannot make a network namespace with nftables here: {e}") from None
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


@dataclass
class Host:
    role: str  # "model-owner", "owner-1", ...
    netns: str  # the namespace's name (unique per Network)
    address: str  # its IPv4 address on the shared link
    iface: str = "eth0"

    def cmd(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace (the environment passes through)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(argv), **kw)

    def link_stats(self) -> dict:
        """rx/tx bytes and packets of this host's link (the veth end in its namespace)."""
        out = json.loads(_run("ip", "-n", self.netns, "-s", "-j", "link", "show", self.iface))
        stats = out[0]["stats64"]
        return {
            "rx_bytes": stats["rx"]["bytes"],
            "tx_bytes": stats["tx"]["bytes"],
            "rx_packets": stats["rx"]["packets"],
            "tx_packets": stats["tx"]["packets"],
        }


@dataclass
class Network:
    """A model owner's host and `others` data-owner hosts; `up()` makes them, `down()` removes them."""

    others: list[str]
    tag: str = field(default_factory=lambda: str(os.getpid()))
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = Host("model-owner", f"ofs-{self.tag}-mo", f"{SUBNET}.1", iface="br0")
        self.hosts = {"model-owner": self.server}
        for i, role in enumerate(self.others):
            self.hosts[role] = Host(role, f"ofs-{self.tag}-{i + 1}", f"{SUBNET}.{11 + i}")

    def up(self) -> Network:
        try:
            for h in self.hosts.values():
                _run("ip", "netns", "add", h.netns)
                _run("ip", "-n", h.netns, "link", "set", "lo", "up")
            mo = self.server.netns
            _run("ip", "-n", mo, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", mo, "addr", "add", f"{self.server.address}/24", "dev", "br0")
            _run("ip", "-n", mo, "link", "set", "br0", "up")
            for i, h in enumerate(self.hosts.values()):
                if h is self.server:
                    continue
                port = f"veth{i}"  # the bridge's end, in the model owner's namespace
                _run(
                    "ip",
                    "link",
                    "add",
                    "name",
                    h.iface,
                    "netns",
                    h.netns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    mo,
                )
                _run("ip", "-n", mo, "link", "set", port, "master", "br0")
                _run("ip", "-n", mo, "link", "set", port, "up")
                _run("ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.iface)
                _run("ip", "-n", h.netns, "link", "set", h.iface, "up")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        # Deleting a namespace deletes its veth ends, the bridge and its nftables ruleset.
        for h in self.hosts.values():
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)

    def firewall(self, open_ports: list[int]) -> None:
        """Drop everything the other hosts send the model owner except `open_ports` (TCP)."""
        rules = [
            "table inet offsite {",
            "  chain input {",
            "    type filter hook input priority 0; policy drop;",
            "    iif lo accept",
            "    ct state established,related accept",
        ]
        for h in self.hosts.values():
            if h is self.server:
                continue
            for port in open_ports:
                rules.append(f"    ip saddr {h.address} tcp dport {port} counter accept")
        rules += ["    counter drop", "  }", "}"]
        _run("ip", "netns", "exec", self.server.netns, "nft", "-f", "-", input="\n".join(rules) + "\n")

    def accepted(self) -> dict[tuple[str, int], dict]:
        """Per (source address, port): the packets and bytes the firewall let through."""
        data = json.loads(_run("ip", "netns", "exec", self.server.netns, "nft", "-j", "list", "ruleset"))
        out = {}
        for item in data.get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            addr = port = counter = None
            for expr in rule.get("expr", []):
                match = expr.get("match")
                if match and match["left"].get("payload", {}).get("field") == "saddr":
                    addr = match["right"]
                elif match and match["left"].get("payload", {}).get("field") == "dport":
                    port = int(match["right"])
                elif "counter" in expr:
                    counter = expr["counter"]
            if addr and port and counter is not None:
                out[(addr, port)] = counter
        return out

    def __enter__(self) -> Network:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


def can_connect(host: Host, address: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from `host` to address:port completes (the probe runs in the host's namespace)."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(float(sys.argv[3]))\n"
        "sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)\n"
    )
    import sys

    proc = host.run([sys.executable, "-c", probe, address, str(port), str(timeout)], timeout=timeout + 20)
    return proc.returncode == 0
