"""Tolerances that fit the dtype a check computes in.

posttrain's checks compare two computations that are equal in exact arithmetic: a reward model's
score padded right and left, a model before and after a reload, policy and reference before the
first update. In float32 the two agree to about 1e-6 of the values' size, and the configured
tolerances are that small (reward.tolerance 1e-4). In bfloat16 (8 significant bits, eps 2^-7) or
float16 (eps 2^-10) the same sum taken in another order or another kernel rounds differently,
and more so the deeper the model: in bf16 a reward score of magnitude ~9 moves by 0.06 (the demo
model, 2 layers) and 0.25 (SmolLM2-135M, 30 layers) between right and left padding, and by 0.20
between a bf16 and a float32 forward: arithmetic, not a fault. A fixed fp32-sized tolerance stops
every bf16 run.

`tolerance` keeps the configured value in float32 and raises it in half precision to a few rounding
steps of the compared values' magnitude. The faults the checks exist for (a score read at a pad
token, a head not saved, a reference that is another model) move the values by their own size,
far above that (a score read at a pad token: 9.0 on SmolLM2 in bf16, 5.8-11.6 on the demo
model), and each check keeps its negative control in bf16.
"""

from __future__ import annotations

# Rounding steps (eps of the dtype, times the values' magnitude) a half-precision comparison may
# differ by. Measured (docs/benchmarks.md): up to 3.6 on SmolLM2 in bf16; 8 leaves twice that.
HALF_PRECISION_STEPS = 8.0


def is_half(dtype) -> bool:
    """bfloat16 or float16 (a torch dtype or its name)."""
    return str(dtype).removeprefix("torch.") in ("bfloat16", "float16")


def eps(dtype) -> float:
    """The dtype's machine epsilon (float32's for anything that is not half precision)."""
    import torch

    name = str(dtype).removeprefix("torch.")
    return torch.finfo(getattr(torch, name) if is_half(name) else torch.float32).eps


def tolerance(configured: float, dtype, scale: float = 1.0) -> float:
    """The tolerance of a check computed in `dtype`: `configured` in float32; in half precision at
    least HALF_PRECISION_STEPS rounding steps of the compared values' magnitude `scale` (≥ 1)."""
    if not is_half(dtype):
        return configured
    return max(configured, HALF_PRECISION_STEPS * eps(dtype) * max(1.0, abs(scale)))

