"""The job's report figure: plug-in perplexity and client emulator perplexity per round."""

from __future__ import annotations

from pathlib import Path


def plot_rounds(job: dict, out: str | Path) -> Path | None:
    """Write a PNG of the job's rounds (None when there is nothing to plot)."""
    rounds = job.get("rounds") or []
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_time) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [r["round"] for r in rounds]
    plugin = [(r["round"], r["plugin_ppl"]) for r in rounds if r.get("plugin_ppl") is not None]
    if job.get("plugin_ppl_initial") is not None:
        plugin = [(0, job["plugin_ppl_initial"])] + plugin
    if plugin:
        ax_ppl.plot(*zip(*plugin), marker="o", label="plug-in (model owner's held-out)")
    client = [
        (
            r["round"],
            sum(c["eval_ppl_after"] for c in r["clients"] if c.get("eval_ppl_after"))
            / max(1, sum(1 for c in r["clients"] if c.get("eval_ppl_after"))),
        )
        for r in rounds
    ]
    client = [(x, y) for x, y in client if y]
    if client:
        ax_ppl.plot(*zip(*client), marker="s", label="emulator (clients' own eval, mean)")
    ax_ppl.set_xlabel("round")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.legend(fontsize=8)
    ax_time.bar(xs, [r["round_seconds"] for r in rounds], label="round")
    ax_time.bar(xs, [r["server_seconds"] for r in rounds], label="server")
    ax_time.set_xlabel("round")
    ax_time.set_ylabel("seconds")
    ax_time.legend(fontsize=8)
    fig.suptitle(f"job {job.get('id', '')}: {len(rounds)} rounds")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
