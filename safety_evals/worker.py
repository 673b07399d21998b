"""Batched model work for one side of an evaluation, through the output cache.

A ``Worker`` runs greedy generation (left-padded batches, KV cache, stop at EOS) and loss
passes for one model, and reads/writes every output through the ``OutputCache``: a key
hashes the model's weight digest with the rendered prompt and the decoding settings, so a
base model's outputs computed for one candidate are reused by every later candidate (the
gate then pays only the candidate's half), and a changed model, item or setting misses.
Each worker counts its own work (``stats``): model seconds, prompt/target tokens run,
tokens generated, cache hits and misses, so a report can say where the time went.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch

from .cache import OutputCache, cache_key

if TYPE_CHECKING:
    from .runner import Side


def _max_positions(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


class Worker:
    """Batched generation and loss computation for one side, through the output cache."""

    def __init__(self, side: Side, cache: OutputCache, batch_size: int, timing: dict, tick: Callable[[int], None]):
        self.side, self.cache, self.batch_size, self.timing, self.tick = side, cache, batch_size, timing, tick
        self.model, self.tok = side.loaded.model, side.loaded.tokenizer
        self.device = next(self.model.parameters()).device
        # This side's share of the work (the suite's record shows it per side).
        self.stats = {
            "model_s": 0.0,
            "hits": 0,
            "misses": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "decode_steps": 0,
            "loss_tokens": 0,
        }

    def _count(self, hits: int, misses: int) -> None:
        self.cache.count(hits=hits, misses=misses)
        self.stats["hits"] += hits
        self.stats["misses"] += misses

    def _spent(self, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.timing["model_s"] += dt
        self.stats["model_s"] += dt

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        keys = [cache_key(self.side.digest, "generate", p, max_new_tokens, "greedy") for p in prompts]
        self.cache.refresh()
        todo = sorted({k: p for k, p in zip(keys, prompts) if k not in self.cache}.items(), key=lambda kp: len(kp[1]))
        self._count(hits=len(set(keys)) - len(todo), misses=len(todo))
        self.tick(len(prompts) - len(todo))
        limit = _max_positions(self.model) - max_new_tokens
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i : i + self.batch_size]
            t0 = time.perf_counter()
            outs = self._generate_batch([p for _, p in batch], max_new_tokens, limit)
            self._spent(t0)
            self.cache.put_many({k: o for (k, _), o in zip(batch, outs)})
            self.tick(len(batch))
        return [self.cache.get(k) for k in keys]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], max_new_tokens: int, limit: int) -> list[str]:
        ids = [self.tok(p, add_special_tokens=False)["input_ids"][-limit:] for p in prompts]
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        # Left padding: every row's next token comes right after its own prompt.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=self.tok.eos_token_id,
        )
        new = out[:, width:]
        self.stats["prompt_tokens"] += int(mask.sum())
        self.stats["decode_steps"] += int(new.shape[1])
        # Tokens up to and including each row's EOS (generate pads the rows that stopped early).
        eos = self.tok.eos_token_id
        for row in new.tolist():
            self.stats["generated_tokens"] += row.index(eos) + 1 if eos in row else len(row)
        return [self.tok.decode(row, skip_special_tokens=True) for row in new]

    def losses(self, pairs: list[tuple[str, str]], max_tokens: int = 256) -> list[dict]:
        """Summed NLL of each `target` given its `context`, and the number of target tokens."""
        keys = [cache_key(self.side.digest, "nll", c, t, max_tokens) for c, t in pairs]
        self.cache.refresh()
        todo = [(k, ct) for k, ct in dict(zip(keys, pairs)).items() if k not in self.cache]
        todo.sort(key=lambda kp: len(kp[1][0]) + len(kp[1][1]))
        self._count(hits=len(set(keys)) - len(todo), misses=len(todo))
        self.tick(len(pairs) - len(todo))
        todo = self._shared_context_losses(todo, max_tokens)
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i : i + self.batch_size]
            t0 = time.perf_counter()
            vals = self._loss_batch([ct for _, ct in batch], max_tokens)
            self._spent(t0)
            self.cache.put_many({k: v for (k, _), v in zip(batch, vals)})
            self.tick(len(batch))
        return [self.cache.get(k) for k in keys]

    def _shared_context_losses(self, todo: list, max_tokens: int) -> list:
        """Score every group of >= 2 targets that share a context with that context run once
        (prefix_losses); returns the pairs left for the row path (plain text, single targets,
        or a context too long to keep whole, which the row path truncates per target)."""
        from .prefix_losses import shared_context_nll

        groups: dict[str, list] = {}
        for kp in todo:
            if kp[1][0]:
                groups.setdefault(kp[1][0], []).append(kp)
        rest, done = [], {}
        shared = {c for c, g in groups.items() if len(g) >= 2}
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for kp in todo:
            if kp[1][0] not in shared:
                rest.append(kp)
        for context in sorted(shared, key=len):
            group = groups[context]
            c = self.tok(context, add_special_tokens=False)["input_ids"]
            ts = [self.tok(t, add_special_tokens=False)["input_ids"][:max_tokens] for _, (_, t) in group]
            if not c or len(c) + max(len(t) for t in ts) > max_tokens:
                rest.extend(group)
                continue
            t0 = time.perf_counter()
            vals = shared_context_nll(self.model, c, ts, pad)
            self._spent(t0)
            self.stats["loss_tokens"] += len(c) + sum(len(t) for t in ts)
            done.update({k: v for (k, _), v in zip(group, vals)})
            if len(done) >= self.batch_size:
                self.cache.put_many(done)
                self.tick(len(done))
                done = {}
        self.cache.put_many(done)
        self.tick(len(done))
        rest.sort(key=lambda kp: len(kp[1][0]) + len(kp[1][1]))
        return rest

    @torch.inference_mode()
    def _loss_batch(self, pairs: list[tuple[str, str]], max_tokens: int) -> list[dict]:
        from offsite.emulators.losses import hidden_states

        rows = []
        for context, target in pairs:
            c = self.tok(context, add_special_tokens=False)["input_ids"] if context else []
            t = self.tok(target, add_special_tokens=False)["input_ids"]
            if not c:  # plain text: the first token has no prediction; condition on BOS/EOS when there is one
                bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
                c = [bos] if bos is not None else t[:1]
                t = t if bos is not None else t[1:]
            t = t[:max_tokens]
            rows.append((c[-max(1, max_tokens - len(t)) :], t))
        width = max(len(c) + len(t) for c, t in rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (c, t) in enumerate(rows):
            n = len(c) + len(t)
            ids[r, :n] = torch.tensor(c + t)
            mask[r, :n] = 1
            labels[r, len(c) : n] = torch.tensor(t)
        self.stats["loss_tokens"] += int(mask.sum())
        ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
        hidden = hidden_states(self.model, ids, mask)
        # Only the positions that predict a target token go through the LM head.
        y = labels[:, 1:]
        sel = y != -100
        h = hidden[:, :-1][sel]
        logits = self.model.get_output_embeddings()(h).float()
        nll = torch.nn.functional.cross_entropy(logits, y[sel], reduction="none")
        row_of = torch.nonzero(sel, as_tuple=False)[:, 0]
        sums = torch.zeros(len(rows), device=nll.device).index_add_(0, row_of, nll)
        return [{"nll": float(sums[r]), "tokens": len(t)} for r, (_, t) in enumerate(rows)]
