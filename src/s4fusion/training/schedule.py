"""Learning-rate schedule of the release (RELEASED-MODEL-FACTS.md section 6.5)."""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosineSchedule"]


class WarmupCosineSchedule:
    """The released ``WarmupCosineSchedule``, same arithmetic, with a state dict.

    Internal step ``s`` starts at 0; each :meth:`step` does ``s += 1`` and then, if
    ``s < warmup_steps``: ``lr = start_lr + s / max(1, warmup_steps) * (ref_lr - start_lr)``;
    otherwise ``p = (s - warmup_steps) / max(1, T_max - warmup_steps)`` and
    ``lr = max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1 + cos(pi p)))``.
    The lr is written to every parameter group and returned. It is set only by
    :meth:`step` (call it before each optimizer step), and past ``T_max`` the cosine
    rises again, as in the release."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        start_lr: float,
        ref_lr: float,
        T_max: int,
        final_lr: float = 0.0,
    ) -> None:
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.start_lr = float(start_lr)
        self.ref_lr = float(ref_lr)
        self.T_max = int(T_max)
        self.final_lr = float(final_lr)
        self._step = 0

    def lr_at(self, s: int) -> float:
        """The lr that the ``s``-th call of :meth:`step` sets."""
        if s < self.warmup_steps:
            progress = s / max(1, self.warmup_steps)
            return self.start_lr + progress * (self.ref_lr - self.start_lr)
        progress = (s - self.warmup_steps) / max(1, self.T_max - self.warmup_steps)
        return max(
            self.final_lr,
            self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)),
        )

    def step(self) -> float:
        self._step += 1
        lr = self.lr_at(self._step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    @property
    def last_step(self) -> int:
        return self._step

    def state_dict(self) -> dict[str, float | int]:
        return {
            "step": self._step,
            "warmup_steps": self.warmup_steps,
            "start_lr": self.start_lr,
            "ref_lr": self.ref_lr,
            "T_max": self.T_max,
            "final_lr": self.final_lr,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("warmup_steps", "T_max"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"schedule {key} of the checkpoint ({state[key]}) differs from this run's ({getattr(self, key)})"
                )
        self._step = int(state["step"])
