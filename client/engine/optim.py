"""AdamW, SGD and a multiplicative learning-rate schedule, without `torch.optim`.

Why not torch.optim: in torch 2.13, constructing or stepping any `torch.optim` optimizer
imports `torch._dynamo` (and sympy with it), +71 MB of resident memory measured on this
CPU build. A sparse client trains a few million parameters in a process whose whole
budget is ~500 MB; the update rules themselves are a dozen lines. `tests/test_engine_optim.py`
checks them step for step against torch.optim.

State dicts keep torch.optim's layout (`{"state": {index: {...}}, "param_groups": [...]}`),
which is what the engine's checkpoints store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class Optimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], **defaults) -> None:
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups = [{"params": params, **defaults}]
        self.state: dict[int, dict] = {}

    def _params(self):
        return enumerate(self.param_groups[0]["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self._params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.param_groups[0]["params"])))
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        params = self.param_groups[0]["params"]
        saved_group = state_dict["param_groups"][0]
        if len(saved_group["params"]) != len(params):
            raise ValueError(
                f"the saved optimizer state has {len(saved_group['params'])} parameters, this one {len(params)}"
            )
        self.param_groups[0].update({k: v for k, v in saved_group.items() if k != "params"})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            self.state[int(i)] = {k: v.to(p.device, p.dtype) if torch.is_tensor(v) else v for k, v in s.items()}


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW computes it."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        for i, p in self._params():
            if p.grad is None:
                continue
            s = self.state.get(i)
            if s is None:
                s = self.state[i] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            s["step"] += 1
            t = s["step"]
            p.mul_(1 - lr * wd)
            s["exp_avg"].lerp_(p.grad, 1 - beta1)
            s["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (s["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(s["exp_avg"], denom, value=-lr / (1 - beta1**t))


class SGD(Optimizer):
    """Plain SGD (no momentum, so no state: the cheapest update there is)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        lr, wd = self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]
        for _, p in self._params():
            if p.grad is not None:
                p.add_(p.grad if not wd else p.grad.add(p, alpha=wd), alpha=-lr)


class LambdaSchedule:
    """lr = base lr x factor(step), set at construction (step 0) and after every `step()`."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float]) -> None:
        self.optimizer, self.factor = optimizer, factor
        self.base_lr = optimizer.param_groups[0]["lr"]
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        self.optimizer.param_groups[0]["lr"] = self.base_lr * self.factor(self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch, self.base_lr = int(state["last_epoch"]), float(state["base_lr"])
        self._apply()
