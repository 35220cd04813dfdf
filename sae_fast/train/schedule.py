"""Learning-rate and sparsity-coefficient schedules, as pure functions of the step (nothing to checkpoint)."""
from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, decay_frac: float, decay: str = "linear") -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup from 0 over ``warmup``
    steps, constant, then decay to 0 over the last ``decay_frac`` of ``total`` steps (Anthropic's schedule)."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_steps = int(round(decay_frac * total))
    if decay != "none" and decay_steps > 0:
        left = total - step  # steps left including this one
        if left <= decay_steps:
            t = left / decay_steps  # 1 at the start of the decay, 1/decay_steps at the last step
            f *= t if decay == "linear" else 0.5 * (1 - math.cos(math.pi * t))
    return f


def sparsity_factor(step: int, total: int, warmup_frac: float) -> float:
    """Multiplier of the L1 / L0 coefficient: a linear ramp from 0 over the first ``warmup_frac`` of the steps,
    so the SAE learns to reconstruct before it is pushed to be sparse."""
    warm = int(round(warmup_frac * total))
    return min(1.0, (step + 1) / warm) if warm > 0 else 1.0
