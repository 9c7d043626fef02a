"""The training recipe moerun runs by default (the paper's Megatron-DeepSpeed scripts)."""

from __future__ import annotations

import math

import pytest

from moeplan.runtime.run import MIN_LR_FRACTION, lr_factor


def test_warm_up_then_cosine_to_a_tenth():
    total = 50
    f = [lr_factor(s, total) for s in range(total)]
    warm = total // 10
    assert f[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)], rel=1e-12)
    assert f[warm] == 1.0 and f[-1] == pytest.approx(MIN_LR_FRACTION, rel=1e-12)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))  # never rises after warm-up
    mid = warm + (total - 1 - warm) / 2  # half way through the decay: half way down
    assert lr_factor(math.floor(mid), total) >= (1 + MIN_LR_FRACTION) / 2 >= lr_factor(
        math.ceil(mid), total)
    assert lr_factor(0, 1) == 1.0 and lr_factor(5, 3) == pytest.approx(MIN_LR_FRACTION)
