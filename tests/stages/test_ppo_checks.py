"""posttrain.stages.ppo_checks: the checks PPO's loop runs on its own numbers (ppo.Loop inherits
them), each at its threshold with a negative control just inside it. The runs that trip them for
real (a leaked repetition penalty, a mismatched first ratio, collapsed generation) are in
test_ppo.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.errors import PosttrainError
from posttrain.sections import PPOStageConfig
from posttrain.stages import ppo_checks


def _loop(**pc) -> ppo_checks.Checks:
    loop = object.__new__(ppo_checks.Checks)  # the checks read only the PPO settings (and the model's dtype)
    loop.pc = PPOStageConfig(**pc)
    return loop


def test_check_health_unit():
    stats = {"score": 1.0, "kl": 2.0, "entropy": 1.0, "explained_variance": float("nan")}
    different = [("What is 1 + 2?", "1 + 2 = 3", 1.0), ("What is 2 + 2?", "2 + 2 = 4", 1.0)]
    same = [("What is 1 + 2?", "42", 0.5), ("What is 2 + 2?", "42", 0.5), ("What is 3 + 2?", "42", 0.5)]
    _loop().check_health(3, stats, different)  # a NaN explained variance is no reason to stop
    with pytest.raises(PosttrainError, match=r"generation collapsed at iteration 3: every response is '42'"):
        _loop().check_health(3, stats, same)
    # the same answer to the same prompt is no collapse; nor is a single sample
    _loop().check_health(3, stats, [("What is 1 + 2?", "42", 0.5)] * 3)
    _loop().check_health(3, stats, same[:1])
    with pytest.raises(PosttrainError, match=r"KL to the reference reached 2\.00 .* 3, over ppo\.kl_cap 1\.5"):
        _loop(kl_cap=1.5).check_health(3, stats, different)
    _loop(kl_cap=None).check_health(3, {**stats, "kl": 1e6}, different)
    with pytest.raises(PosttrainError, match=r"NaN/inf at iteration 3: entropy"):
        _loop().check_health(3, {**stats, "entropy": float("inf")}, different)


def test_negative_kl_and_entropy_collapse_stop_at_their_thresholds():
    """Issue 16 item 7: a mean KL per response below -ppo.negative_kl_stop (the responses were not
    sampled from the distribution PPO computes) and a mean entropy below ppo.min_entropy stop the
    run; just inside either threshold does not, and None turns each off."""
    stats = {"score": 1.0, "kl": 0.5, "entropy": 1.0, "explained_variance": 0.0}
    different = [("What is 1 + 2?", "1 + 2 = 3", 1.0), ("What is 2 + 2?", "2 + 2 = 4", 1.0)]
    _loop().check_health(3, {**stats, "kl": -0.99}, different)
    with pytest.raises(PosttrainError, match=r"KL to the reference is -1\.01 nats per response at iteration 3, "
                                             r"below -ppo\.negative_kl_stop -1\.0"):
        _loop().check_health(3, {**stats, "kl": -1.01}, different)
    _loop(negative_kl_stop=None).check_health(3, {**stats, "kl": -50.0}, different)
    _loop().check_health(3, {**stats, "entropy": 1.01e-3}, different)
    with pytest.raises(PosttrainError, match=r"entropy fell to 0\.00099 nats per token at iteration 3"):
        _loop().check_health(3, {**stats, "entropy": 0.99e-3}, different)
    _loop(min_entropy=None).check_health(3, {**stats, "entropy": 0.0}, different)


def _sampler_loop(dtype: str) -> ppo_checks.Checks:
    loop = _loop()
    loop.cfg = SimpleNamespace(model=SimpleNamespace(dtype=dtype))  # check_sampler reads only the model's dtype
    return loop


def test_sampler_check_stops_at_its_thresholds():
    """Issue 16 item 3: the tokens' sampled log-probs must be PPO's. float32: mean |d| over
    ppo_checks.SAMPLER_GAP stops the run, just under does not. bf16: the signed mean (an estimate of
    KL(sampler || PPO)) over ppo_checks.SAMPLER_KL_HALF stops it; SmolLM2's bf16 rounding without any
    fault (mean |d| 0.05, mean d 3e-3) does not. Without recorded log-probs there is nothing to check."""
    fp32, bf16 = _sampler_loop("float32"), _sampler_loop("bfloat16")
    fp32.check_sampler(3, {"sampler_gap": 0.9 * ppo_checks.SAMPLER_GAP, "sampler_kl": 0.0})
    with pytest.raises(PosttrainError, match=r"at iteration 3 the tokens were sampled from another distribution than "
                                             r"the one PPO computes: .* 1\.10e-03 nats per token "
                                             r"on average \(absolute\)"):
        fp32.check_sampler(3, {"sampler_gap": 1.1 * ppo_checks.SAMPLER_GAP, "sampler_kl": 0.0})
    bf16.check_sampler(3, {"sampler_gap": 0.05, "sampler_kl": 3e-3})
    bf16.check_sampler(3, {"sampler_gap": 0.05, "sampler_kl": 0.9 * ppo_checks.SAMPLER_KL_HALF})
    with pytest.raises(PosttrainError, match=r"3\.30e-02 nats per token on average \(an estimated KL\), over 0\.03"):
        bf16.check_sampler(3, {"sampler_gap": 0.05, "sampler_kl": 1.1 * ppo_checks.SAMPLER_KL_HALF})
    fp32.check_sampler(3, {})


def test_first_ratio_check_stops_at_its_thresholds():
    """float32: max |ratio - 1| over FIRST_RATIO_TOLERANCE stops, just under does not, whatever the
    mean. Half precision: a per-token maximum from kernel noise does not stop; the mean |log-ratio|
    over FIRST_RATIO_HALF does, just under does not. Sums are over the mini-batch's 100 tokens; the
    maximum is taken over the processes (here: a second process's larger one decides)."""
    def check(dtype, mean_abs, worst, elsewhere=0.0):
        loop = _sampler_loop(dtype)
        loop.check_first_ratio(torch.tensor([mean_abs * 100, 0.0, worst]), torch.tensor(100.0), lambda x: x,
                               lambda x: torch.maximum(x, torch.tensor(elsewhere)))
        return loop.first_ratio

    assert check("float32", 1e-3, 0.9 * ppo_checks.FIRST_RATIO_TOLERANCE)["max_ratio_dev"] == pytest.approx(9e-4)
    with pytest.raises(PosttrainError, match=r"the probability ratio is off 1 by 1\.10e-03 \(allowed 0\.001\)"):
        check("float32", 0.0, 1.1 * ppo_checks.FIRST_RATIO_TOLERANCE)
    with pytest.raises(PosttrainError, match=r"the probability ratio is off 1 by 1\.10e-03"):
        check("float32", 0.0, 0.5 * ppo_checks.FIRST_RATIO_TOLERANCE, elsewhere=1.1 * ppo_checks.FIRST_RATIO_TOLERANCE)
    assert check("bfloat16", 0.9 * ppo_checks.FIRST_RATIO_HALF, 0.5)["mean_abs_log_ratio"] == pytest.approx(0.045)
    with pytest.raises(PosttrainError, match=r"the mean \|log-ratio\| per token is 5\.50e-02 \(allowed 0\.05\)"):
        check("bfloat16", 1.1 * ppo_checks.FIRST_RATIO_HALF, 0.0)
