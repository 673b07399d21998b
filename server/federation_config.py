"""A federated job's settings, and their flat form for Flower's run config.

The same `FederationConfig` drives the simulation engine (passed in-process) and the
deployment engine (flattened into `flwr run -c key=value` pairs, which only carry
scalars), so both engines read one definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class FederationConfigError(ValueError):
    """A job setting is missing or out of range; the message names it and the fix."""


@dataclass
class FederationConfig:
    job_id: str
    model: str  # base model name or directory (the model owner's; used for plug-in)
    bundle: str  # the signed emulator bundle (model owner's copy: directory or .tar)
    bundle_digest: str  # what clients look the bundle up by in their cache
    job_dir: str  # checkpoints, per-round adapters, job.json
    public_key: str = ""  # signing.pub to verify the bundle with ("" = trust the local copy)
    rounds: int = 3
    min_clients: int = 2  # fewer successful replies than this fails the round
    fraction: float = 1.0  # share of connected clients sampled per round
    round_timeout: float = 600.0  # seconds to wait for replies in a round
    # client training (sent in each round's config)
    local_steps: int = 10
    lr: float = 1e-4
    batch_size: int = 4
    block_size: int = 256
    scheme: str = "full"
    # what a client sends back: "auto" (sparse fp16 deltas, or the full adapter under DP or
    # SecAgg+, which need every client to send the same fixed-length vector), "full",
    # "sparse-fp16" or "sparse-int8" (offsite.wire)
    upload: str = "auto"
    seed: int = 0
    eval_fraction: float = 0.1  # share of each client's blocks it scores itself on (0: no client eval)
    # model owner's held-out set for plug-in perplexity: "python-reference" or a path
    heldout: str = "python-reference"
    heldout_limit: int = 0  # at most this many held-out blocks (0 = all)
    eval_every: int = 1  # plug-in perplexity every N rounds (and always after the last)
    # robustness and privacy
    norm_bound: float = 0.0  # max L2 norm of one client's update (0 = off)
    dp_noise_multiplier: float = 0.0  # > 0 turns on DP (client-side fixed clipping + Gaussian noise)
    dp_clipping_norm: float = 0.0
    dp_delta: float = 1e-5
    dp_population: int = 0  # data owners in the federation (0 = the number connected)
    secagg: bool = False
    secagg_shares: float = 1.0  # share of sampled clients that hold a key share (float) or a count (>1)
    secagg_threshold: float = 0.67
    # Values are quantized over [-range, range] after scaling by examples / max_weight: updates
    # (not weights) travel under SecAgg+, so a narrow range keeps the quantization step small.
    secagg_clipping_range: float = 1.0
    secagg_max_weight: float = 1000.0  # >= the largest client example count, or weights saturate
    # where results go
    registry_url: str = ""  # sqlite:///... of the server's registry ("" = job.json only)
    artifacts_root: str = ""
    candidate_dir: str = ""  # where the plugged-in candidate model is exported ("" = job_dir/candidate)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise FederationConfigError(f"rounds must be at least 1 (got {self.rounds})")
        if self.min_clients < 1:
            raise FederationConfigError(f"min_clients must be at least 1 (got {self.min_clients})")
        if not 0.0 < self.fraction <= 1.0:
            raise FederationConfigError(f"fraction must be in (0, 1] (got {self.fraction})")
        if self.round_timeout <= 0:
            raise FederationConfigError(f"round_timeout must be positive (got {self.round_timeout})")
        if self.dp_noise_multiplier < 0:
            raise FederationConfigError("dp_noise_multiplier must be >= 0 (0 turns DP off)")
        if self.dp_enabled and self.dp_clipping_norm <= 0:
            raise FederationConfigError("DP needs a positive dp_clipping_norm (the L2 bound of one client's update)")
        if self.dp_enabled and self.secagg:
            raise FederationConfigError(
                "DP and SecAgg+ together are not supported by this job runner; choose one (--dp-noise or --secagg)"
            )
        if self.norm_bound < 0:
            raise FederationConfigError("norm_bound must be >= 0 (0 turns it off)")
        if self.upload not in ("auto", "full", "sparse-fp16", "sparse-int8"):
            raise FederationConfigError(f"upload must be auto, full, sparse-fp16 or sparse-int8 (got {self.upload!r})")
        if self.upload.startswith("sparse") and (self.dp_enabled or self.secagg):
            raise FederationConfigError(
                f"upload {self.upload!r} cannot be combined with DP or SecAgg+: both need every client to send the whole "
                "adapter as one fixed-length vector; use upload 'auto' or 'full'"
            )

    @property
    def dp_enabled(self) -> bool:
        return self.dp_noise_multiplier > 0

    @property
    def upload_format(self) -> str:
        """The upload format clients are asked for ("auto" resolved)."""
        if self.upload == "auto":
            return "full" if (self.dp_enabled or self.secagg) else "sparse-fp16"
        return self.upload

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """Flat scalars with Flower-style dashed keys, for `flwr run -c`."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: dict) -> "FederationConfig":
        """Inverse of `to_run_config`; unknown keys are ignored, types are coerced."""
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                continue
            raw = run_config[key]
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "bool":
                values[f.name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            elif kind == "int":
                values[f.name] = int(raw)
            elif kind == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        missing = [n for n in ("job_id", "model", "bundle", "bundle_digest", "job_dir") if n not in values]
        if missing:
            raise FederationConfigError(
                f"the run config lacks {', '.join(m.replace('_', '-') for m in missing)}; "
                "pass them with `flwr run ... -c key=value` (offsite-admin job run does this for you)"
            )
        return cls(**values)
