"""Protection against data owners who do more than follow the recipe.

A data owner holds the emulator's weights. Three of them, with the same data (its own
training shard), steps, learning rate and batch order:

- `recipe`: trains the adapter blocks only (what Offsite-Tuning prescribes);
- `recalibrated`: the adapter, every norm gain and one logit temperature (a cheap repair
  of a low-bit model's scale errors);
- `full_finetune`: every parameter of the dequantized emulator (embeddings, middle,
  norms, adapter), the strongest owner of the weights.

Each is measured on two held-out sets: the data owner's own domain and general text it
never trained on. Protection against an owner on a set = that owner's emulator perplexity
/ the perplexity of the product's output there (the recipe's adapter plugged into the full
model). Higher protects more; 1.0 means the owner ends as well off as the product.
"""

from __future__ import annotations

import copy

import torch

from bench.common import blocks_state_by_original, block_params, heldout_ppl, plug_state, train_blocks, train_parameters
from offsite.emulators.data import TokenBlocks

ATTACKERS = ("recipe", "full_finetune", "recalibrated")  # the recipe first: its adapter makes the plug-in
TEMPERATURE_PARAM = "offsite_log_temperature"


def add_logit_temperature(model, family) -> torch.nn.Parameter:
    """A trainable scalar t with logits = head(norm(h) * exp(t)): a logit temperature,
    applied at the final norm so the chunked loss needs no change."""
    norm = model.get_submodule(family.final_norm)
    p = torch.nn.Parameter(torch.zeros(()))
    norm.register_parameter(TEMPERATURE_PARAM, p)
    norm.register_forward_hook(lambda m, _i, out: out * getattr(m, TEMPERATURE_PARAM).exp())
    return p


def norm_params(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter of every norm module (RMSNorm/LayerNorm gains and biases, the
    final norm, and a logit temperature registered on it)."""
    return {
        f"{mn}.{pn}" if mn else pn: p
        for mn, mod in model.named_modules()
        if "norm" in type(mod).__name__.lower()
        for pn, p in mod.named_parameters(recurse=False)
    }


def attacker_params(model, family, adapter_positions: list[int], attacker: str) -> dict[str, torch.nn.Parameter]:
    """The parameters `attacker` trains (the model must be dequantized: plain Linears)."""
    if attacker not in ATTACKERS:
        raise ValueError(f"unknown data owner {attacker!r}; known: {', '.join(ATTACKERS)}")
    if attacker == "full_finetune":
        return dict(model.named_parameters())
    params = block_params(model, family, adapter_positions)
    if attacker == "recalibrated":
        add_logit_temperature(model, family)
        params.update(norm_params(model))
    return params


def ppl_on(model, sets: dict[str, TokenBlocks]) -> dict[str, float]:
    return {name: heldout_ppl(model, blocks) for name, blocks in sets.items()}


def measure_owners(
    loaded,
    emulator,
    plan,
    train: TokenBlocks,
    sets: dict[str, TokenBlocks],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    attackers=ATTACKERS,
    label: str = "",
    cached=None,
    owner_lr: dict[str, float] | None = None,
) -> dict:
    """Perplexities on every set of: the emulator alone, the emulator after each owner's
    training, and the recipe's adapter plugged into the full model (`plugin`).

    `emulator` is a zero-argument callable returning the dequantized (plain Linear)
    emulator, called only if some part is not in the cache; `cached(part, compute)`
    returns a stored part or computes and stores it, so an interrupted row keeps the
    owners it finished. `owner_lr` gives an owner its own learning rate (a data owner
    tunes its attack: full fine-tuning wants a lower lr than an adapter); its cache part
    is then named with the lr."""
    cached = cached or (lambda _part, compute: compute())
    owner_lr = owner_lr or {}
    family = loaded.family
    built = {}

    def emu():
        if "m" not in built:
            built["m"] = emulator()
        return built["m"]

    zero_shot = cached("zero_shot", lambda: ppl_on(emu(), sets))
    out: dict = {"emulator_zero_shot": zero_shot or {s: None for s in sets}, "s_per_step": {}}
    for attacker in attackers:
        tag = f"{label}:{attacker}" if label else attacker

        a_lr = owner_lr.get(attacker, lr)

        def compute(attacker=attacker, tag=tag, a_lr=a_lr) -> dict:
            m = copy.deepcopy(emu())
            if attacker == "recipe":
                # the recipe uses the bench's block trainer itself (the rows charted before it)
                tr = train_blocks(m, family, plan.adapter_positions, train, steps, lr, batch_size, seed, progress=tag)
                adapter = blocks_state_by_original(m, family, plan.adapter_positions, plan.layer_origin)
            else:
                params = attacker_params(m, family, plan.adapter_positions, attacker)
                tr = train_parameters(m, params, train, steps, a_lr, batch_size, seed, progress=tag)
            part = {"ppl": ppl_on(m, sets), "s_per_step": tr["s_per_step"]}
            del m
            if attacker == "recipe":
                full = copy.deepcopy(loaded.model)
                plug_state(full, adapter)
                part["plugin"] = ppl_on(full, sets)
                del full
            print(f"[{tag}] " + ", ".join(f"{k} {v:.2f}" for k, v in part["ppl"].items()), flush=True)
            return part

        part = cached(attacker if a_lr == lr else f"{attacker}@lr{a_lr:g}", compute)
        if part is None:  # not measured yet (the caller reads the cache only)
            continue
        out[attacker] = part["ppl"]
        out["s_per_step"][attacker] = part["s_per_step"]
        if "plugin" in part:
            out["plugin"] = part["plugin"]
    return out


def protections(row: dict, attackers=ATTACKERS) -> dict[str, dict[str, float]]:
    """attacker -> set -> that owner's emulator ppl / the plug-in's ppl."""
    return {a: {s: row[a][s] / row["plugin"][s] for s in row["plugin"]} for a in attackers if a in row}
