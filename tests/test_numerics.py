"""numerics.tolerance: the configured tolerance in float32, a rounding-sized one in half precision."""

from __future__ import annotations

import pytest
import torch

from posttrain import numerics


def test_float32_keeps_the_configured_tolerance():
    assert numerics.tolerance(1e-4, torch.float32, scale=100.0) == 1e-4
    assert numerics.tolerance(1e-4, "float32") == 1e-4


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10), ("bfloat16", 2 ** -7)])
def test_half_precision_is_rounding_steps_of_the_scale(dtype, eps):
    steps = numerics.HALF_PRECISION_STEPS
    assert numerics.tolerance(1e-4, dtype, scale=9.0) == pytest.approx(steps * eps * 9.0)
    assert numerics.tolerance(1e-4, dtype, scale=-9.0) == pytest.approx(steps * eps * 9.0)
    # values below 1 in size are held to the steps of 1, not tighter
    assert numerics.tolerance(1e-4, dtype, scale=0.01) == pytest.approx(steps * eps)
    # a configured tolerance larger than that is kept
    assert numerics.tolerance(5.0, dtype, scale=9.0) == 5.0

