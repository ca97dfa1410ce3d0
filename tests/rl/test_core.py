"""Unit tests for posttrain.rl.core against numbers computed by hand (docs/ppo.md is the spec).

Every expected value below is either written out as arithmetic in a comment or computed by a
plain-Python loop that does not call the code under test.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch.testing import assert_close

from posttrain.rl.core import (
    KLController,
    entropy_from_logits,
    explained_variance,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

F = torch.float32


def t(rows, dtype=F):
    return torch.tensor(rows, dtype=dtype)


def close(actual, expected, tol=1e-6):
    assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


def run_two_processes(fn, args_a, args_b):
    """Run fn(*args, reduce=...) in two threads whose `reduce` is a real all-reduce (sum) between
    them, like torch.distributed.all_reduce over two ranks. Works whatever tensor layout fn passes
    to reduce and however many times it calls it."""
    barrier = threading.Barrier(2)
    slots: list = [None, None]
    results: list = [None, None]
    errors: list = []

    def make_reduce(rank):
        def reduce(x):
            slots[rank] = x.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before anyone writes the next round
            return total
        return reduce

    def worker(rank, args):
        try:
            results[rank] = fn(*args, reduce=make_reduce(rank))
        except BaseException as e:  # noqa: BLE001 pragma: no cover - re-raised below, whatever it is
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r, a)) for r, a in enumerate((args_a, args_b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------- masked_mean / masked_whiten

def test_masked_mean_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7.0 / 3.0)  # (1 + 2 + 4) / 3


def test_masked_mean_empty_mask_is_finite_zero():
    out = masked_mean(t([[1.0, 2.0]]), t([[0, 0]]))
    assert torch.isfinite(out)
    close(out, 0.0)


def test_masked_mean_two_processes_equals_global_mean():
    xa, ma = t([[1.0, 2.0, 9.0]]), t([[1, 1, 0]])
    xb, mb = t([[10.0, 50.0, 50.0]]), t([[1, 0, 0]])
    a, b = run_two_processes(masked_mean, (xa, ma), (xb, mb))
    # (1 + 2 + 10) / 3, NOT the mean of the per-process means ((1.5 + 10) / 2 = 5.75)
    close(a, 13.0 / 3.0)
    close(b, 13.0 / 3.0)


def test_loss_shares_of_two_processes_average_to_the_global_token_mean():
    """policy/value losses with count = global tokens / processes: the mean of the two processes'
    losses (what DDP's gradient averaging sees) is the token mean over both, although one holds 2
    real tokens and the other 1 (the plain per-process means average to 5.75 instead)."""
    from posttrain.rl.core import token_sum_over

    xa, ma = t([[1.0, 2.0, 9.0]]), t([[1, 1, 0]])
    xb, mb = t([[10.0, 50.0, 50.0]]), t([[1, 0, 0]])
    count = (ma.sum() + mb.sum()) / 2
    a, b = token_sum_over(xa, ma, count), token_sum_over(xb, mb, count)
    close((a + b) / 2, 13.0 / 3.0)
    close(token_sum_over(xa, ma, None), 1.5)  # one process, no count: its own masked mean
    # split into micro-batches, the shares add up to the mini-batch mean
    close(token_sum_over(xa[:, :1], ma[:, :1], 2.0) + token_sum_over(xa[:, 1:], ma[:, 1:], 2.0), 1.5)
    # the clipped losses take the same count
    loss, _ = value_loss(xa, xa, xa + 1.0, ma, 0.2, count)
    close(loss, 0.5 * 2 / 1.5)


# real tokens 1, 2, 3 | 5, 7; padding 100
WX = [[1.0, 2.0, 3.0, 100.0], [5.0, 7.0, 100.0, 100.0]]
WM = [[1, 1, 1, 0], [1, 1, 0, 0]]
# mean = 18 / 5 = 3.6; deviations -2.6 -1.6 -0.6 1.4 3.4;
# squares 6.76 + 2.56 + 0.36 + 1.96 + 11.56 = 23.2; unbiased var = 23.2 / 4 = 5.8
W_MEAN, W_STD = 3.6, math.sqrt(5.8)


def _hand_whiten(shift_mean=True):
    out = []
    for xr, mr in zip(WX, WM):
        row = []
        for x, m in zip(xr, mr):
            if m == 0:
                row.append(0.0)
            else:
                z = (x - W_MEAN) / W_STD
                row.append(z if shift_mean else z + W_MEAN)
        out.append(row)
    return out


def test_masked_whiten_by_hand():
    x, mask = t(WX), t(WM)
    out = masked_whiten(x, mask)
    close(out, _hand_whiten(), tol=1e-6)
    real = out[mask.bool()]
    close(real.mean(), 0.0, tol=1e-6)
    close(real.std(unbiased=True), 1.0, tol=1e-6)  # unbiased std over the 5 real tokens
    assert torch.equal(out[~mask.bool()], torch.zeros(3))  # padding exactly 0


def test_masked_whiten_keep_mean():
    x, mask = t(WX), t(WM)
    out = masked_whiten(x, mask, shift_mean=False)
    close(out, _hand_whiten(shift_mean=False), tol=1e-6)
    real = out[mask.bool()]
    close(real.mean(), W_MEAN, tol=1e-6)  # mean kept at 3.6
    close(real.std(unbiased=True), 1.0, tol=1e-6)
    assert torch.equal(out[~mask.bool()], torch.zeros(3))


def test_masked_whiten_two_processes_equals_whitening_the_concatenation():
    x, mask = t(WX), t(WM)
    a, b = run_two_processes(masked_whiten, (x[:1], mask[:1]), (x[1:], mask[1:]))
    close(torch.cat([a, b]), _hand_whiten(), tol=1e-6)
    # negative control: whitening each half alone is different
    alone = torch.cat([masked_whiten(x[:1], mask[:1]), masked_whiten(x[1:], mask[1:])])
    assert not torch.allclose(alone, torch.cat([a, b]), atol=1e-3)


# ---------------------------------------------------------------- log-probs / entropy

def test_logprobs_with_temperature_by_hand():
    logits = t([[[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]]])  # [batch 1, 2 positions, vocab 3]
    tokens = torch.tensor([[0, 2]])
    temp = 2.0
    expected = []
    for row, tok in zip(logits[0].tolist(), tokens[0].tolist()):
        scaled = [v / temp for v in row]  # e.g. [1, 0.5, 0]
        log_z = math.log(sum(math.exp(v) for v in scaled))  # ln(e + e^0.5 + 1) = ln 5.367003
        expected.append(scaled[tok] - log_z)
    # position 0: 1 - ln(5.367003) = -0.680272
    assert expected[0] == pytest.approx(1 - math.log(math.e + math.exp(0.5) + 1))
    out = logprobs_from_logits(logits, tokens, temperature=temp)
    assert out.shape == (1, 2)
    close(out, [expected], tol=1e-6)
    # the temperature matters: at T=1 the log-prob of token 0 at position 0 is 2 - ln(e² + e + 1)
    out1 = logprobs_from_logits(logits, tokens, temperature=1.0)
    close(out1[0, 0], 2 - math.log(math.exp(2) + math.e + 1), tol=1e-6)
    assert abs(out1[0, 0].item() - out[0, 0].item()) > 0.1


def test_entropy_uniform_is_log_vocab():
    logits = torch.full((2, 3, 5), 0.7)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(5)), tol=1e-6)
    close(entropy_from_logits(logits, temperature=0.5), torch.full((2, 3), math.log(5)), tol=1e-6)


def test_entropy_by_hand():
    logits = t([[math.log(1.0), math.log(3.0)]])  # p = [0.25, 0.75]
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335
    close(entropy_from_logits(logits), [expected], tol=1e-6)


# ---------------------------------------------------------------- per-token rewards

def test_per_token_rewards_by_hand():
    beta = 0.1
    logp = t([[-1.0, -2.0, -3.0, -4.0],
              [-0.5, -1.5, -9.0, -2.0],
              [-1.0, -1.0, -1.0, -1.0],
              [-1.0, -1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.0, -3.0, -9.0],  # padding differs on purpose
             [-1.0, -1.0, -1.0, -7.0],
             [-2.0, -2.0, -2.0, -2.0],
             [-1.0, -1.0, -1.0, -2.0]])
    mask = t([[1, 1, 1, 0],  # length 3
              [1, 1, 0, 0],  # length 2
              [0, 0, 0, 0],  # empty
              [1, 1, 1, 1]])  # full
    scores = t([2.0, -1.0, 5.0, 3.0])
    rewards, kl = per_token_rewards(scores, logp, ref, mask, beta)
    # kl = logp - ref on real tokens, 0 on padding
    close(kl, [[0.5, -1.0, 0.0, 0.0],
               [0.5, -0.5, 0.0, 0.0],
               [0.0, 0.0, 0.0, 0.0],
               [0.0, 0.0, 0.0, 1.0]])
    # r = -0.1 * kl, + score at the last real token
    close(rewards, [[-0.05, 0.1, 0.0 + 2.0, 0.0],
                    [-0.05, 0.05 - 1.0, 0.0, 0.0],
                    [0.0, 0.0, 0.0, 0.0],  # empty row: no score anywhere
                    [0.0, 0.0, 0.0, -0.1 + 3.0]])
    assert torch.equal(rewards[~mask.bool()], torch.zeros(7))
    assert torch.equal(kl[~mask.bool()], torch.zeros(7))


def test_per_token_rewards_score_position_loop():
    """Score lands at index len-1 for every length (plain loop reference)."""
    width = 5
    lengths = [1, 2, 3, 4, 5]
    mask = t([[1.0 if j < n else 0.0 for j in range(width)] for n in lengths])
    logp = torch.zeros(len(lengths), width)
    scores = t([10.0, 20.0, 30.0, 40.0, 50.0])
    rewards, _ = per_token_rewards(scores, logp, logp.clone(), mask, 0.5)
    expected = [[scores[i].item() if j == n - 1 else 0.0 for j in range(width)] for i, n in enumerate(lengths)]
    close(rewards, expected)


# ---------------------------------------------------------------- GAE

def test_gae_three_tokens_by_hand():
    r, v = t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # γλ = 0.72
    # t=2: δ = 2 + 0.9·0 - 1.5 = 0.5;            A2 = 0.5
    # t=1: δ = 0 + 0.9·1.5 - 1.0 = 0.35;         A1 = 0.35 + 0.72·0.5 = 0.71
    # t=0: δ = 1 + 0.9·1.0 - 0.5 = 1.4;          A0 = 1.4 + 0.72·0.71 = 1.9112
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[1.9112 + 0.5, 0.71 + 1.0, 0.5 + 1.5]])  # R = A + V


def test_gae_value_is_zero_after_last_real_token():
    r = t([[1.0, 2.0, 99.0]])
    v = t([[0.5, 1.0, 7.0]])  # V at the padded position must not be bootstrapped from
    mask = t([[1, 1, 0]])
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    # t=1: δ = 2 + 0.9·0 - 1.0 = 1;  A1 = 1
    # t=0: δ = 1 + 0.9·1.0 - 0.5 = 1.4;  A0 = 1.4 + 0.72·1 = 2.12
    close(adv, [[2.12, 1.0, 0.0]])
    close(ret, [[2.62, 2.0, 0.0]])
    # the same row alone at width 2
    adv2, ret2 = gae(r[:, :2], v[:, :2], torch.ones(1, 2), gamma=0.9, lam=0.8)
    close(adv[:, :2], adv2)
    close(ret[:, :2], ret2)
    close(adv2, [[2.12, 1.0]])


def test_gae_gamma1_lambda1_returns_are_reward_to_go():
    r = t([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 50.0, 50.0]])
    v = t([[0.3, -1.0, 2.0, 0.7], [1.0, 2.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    # returns = sum of future rewards: [10, 9, 7, 4] and [11, 6, pad, pad]
    close(ret, [[10.0, 9.0, 7.0, 4.0], [11.0, 6.0, 0.0, 0.0]])
    close(adv, [[10 - 0.3, 9 + 1.0, 7 - 2.0, 4 - 0.7], [11 - 1.0, 6 - 2.0, 0.0, 0.0]])


def test_gae_lambda0_is_one_step_td():
    r, v = t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]])
    adv, _ = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.0)
    # A_t = r_t + γV_{t+1} - V_t: [1 + 0.9 - 0.5, 0 + 1.35 - 1.0, 2 + 0 - 1.5]
    close(adv, [[1.4, 0.35, 0.5]])


def test_gae_matches_plain_python_loop_on_random_rows():
    g = torch.Generator().manual_seed(0)
    width, gamma, lam = 6, 0.97, 0.9
    lengths = [6, 4, 1, 0, 3]
    r = torch.randn(len(lengths), width, generator=g)
    v = torch.randn(len(lengths), width, generator=g)
    mask = t([[1.0 if j < n else 0.0 for j in range(width)] for n in lengths])
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = [], []
    for i, n in enumerate(lengths):
        rr, vv = r[i].tolist()[:n], v[i].tolist()[:n]
        a, out = 0.0, [0.0] * width
        for k in reversed(range(n)):
            nxt = vv[k + 1] if k + 1 < n else 0.0
            a = rr[k] + gamma * nxt - vv[k] + gamma * lam * a
            out[k] = a
        exp_adv.append(out)
        exp_ret.append([out[k] + vv[k] if k < n else 0.0 for k in range(width)])
    close(adv, exp_adv, tol=1e-5)
    close(ret, exp_ret, tol=1e-5)


# ---------------------------------------------------------------- policy loss

def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -4.0, -4.0]])
    adv = t([[1.0, -2.0, 3.0], [0.5, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, cliprange=0.2)
    close(loss, -(1.0 - 2.0 + 3.0 + 0.5) / 4)  # -0.625
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)


# four tokens, ε = 0.2:
#   A=+2, ratio 1.5: -A·r = -3.0, -A·clip = -2.4  → max -2.4 (clipped)
#   A=+2, ratio 0.5: -A·r = -1.0, -A·clip = -1.6  → max -1.0 (NOT clipped)
#   A=-2, ratio 0.5: -A·r = +1.0, -A·clip = +1.6  → max +1.6 (clipped at 0.8)
#   A=-2, ratio 1.5: -A·r = +3.0, -A·clip = +2.4  → max +3.0 (NOT clipped)
CLIP_RATIOS = [1.5, 0.5, 0.5, 1.5]
CLIP_ADV = [2.0, 2.0, -2.0, -2.0]


def _clip_case(pad_logp=-3.0):
    old = t([[-1.0, -2.0, -1.5, -0.7, -2.0]])
    logp = old.clone()
    for j, ratio in enumerate(CLIP_RATIOS):
        logp[0, j] = old[0, j] + math.log(ratio)
    logp[0, 4] = pad_logp  # padded position
    adv = t([CLIP_ADV + [100.0]])
    mask = t([[1, 1, 1, 1, 0]])
    return logp, old, adv, mask


def test_policy_loss_positive_advantage_clipped_at_1_plus_eps():
    logp, old, adv, mask = _clip_case()
    loss, stats = policy_loss(logp[:, :1], old[:, :1], adv[:, :1], mask[:, :1], cliprange=0.2)
    close(loss, -1.2 * 2.0)  # uses 1.2·A, not 1.5·A = -3.0
    close(stats["clipfrac"], 1.0)


def test_policy_loss_positive_advantage_low_ratio_is_not_clipped():
    # negative control: ratio 0.5 with A > 0 keeps the unclipped (pessimistic) value
    logp, old, adv, mask = _clip_case()
    loss, stats = policy_loss(logp[:, 1:2], old[:, 1:2], adv[:, 1:2], mask[:, 1:2], cliprange=0.2)
    close(loss, -0.5 * 2.0)  # -1.0, not -0.8·2 = -1.6
    close(stats["clipfrac"], 0.0)


def test_policy_loss_negative_advantage_clipped_at_1_minus_eps():
    logp, old, adv, mask = _clip_case()
    loss, stats = policy_loss(logp[:, 2:3], old[:, 2:3], adv[:, 2:3], mask[:, 2:3], cliprange=0.2)
    close(loss, -0.8 * -2.0)  # +1.6, not -0.5·-2 = +1.0
    close(stats["clipfrac"], 1.0)
    # and its negative control: ratio 1.5 with A < 0 is not clipped
    loss, stats = policy_loss(logp[:, 3:4], old[:, 3:4], adv[:, 3:4], mask[:, 3:4], cliprange=0.2)
    close(loss, -1.5 * -2.0)  # +3.0
    close(stats["clipfrac"], 0.0)


def test_policy_loss_batch_stats_and_padding():
    logp, old, adv, mask = _clip_case()
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    close(loss, (-2.4 - 1.0 + 1.6 + 3.0) / 4)  # 0.3
    close(stats["clipfrac"], 2 / 4)
    lr = [math.log(r) for r in CLIP_RATIOS]
    close(stats["approx_kl"], 0.5 * sum(x * x for x in lr) / 4)  # ½·mean(log_ratio²)
    # ratio_max_dev over real tokens only: |1.5 - 1| = |0.5 - 1| = 0.5 (pad ratio would be e^-1 → 0.63)
    close(stats["ratio_max_dev"], 0.5)
    # changing logp at the padded position changes nothing, even to a value whose ratio would
    # overflow (e^102 = inf in float32; inf·0 would turn the masked mean into NaN)
    for pad in (5.0, 100.0):
        logp2, *_ = _clip_case(pad_logp=pad)
        logp2.requires_grad_(True)
        loss2, stats2 = policy_loss(logp2, old, adv, mask, cliprange=0.2)
        assert torch.equal(loss2.detach(), loss), pad
        for k in stats:
            assert torch.equal(stats2[k], stats[k]), (pad, k)
        loss2.backward()
        assert logp2.grad[0, 4] == 0 and torch.isfinite(logp2.grad).all(), pad


def test_policy_loss_gradient_zero_where_clip_active():
    logp, old, adv, mask = _clip_case()
    logp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, cliprange=0.2)
    loss.backward()
    # d/dlogp of -A·ratio / N = -A·ratio / 4 where unclipped, 0 where the clip is active, 0 on padding
    expected = [[0.0,                 # A=+2, r=1.5, clipped
                 -2.0 * 0.5 / 4,      # A=+2, r=0.5, not clipped: -0.25
                 0.0,                 # A=-2, r=0.5, clipped
                 2.0 * 1.5 / 4,       # A=-2, r=1.5, not clipped: +0.75
                 0.0]]                # padding
    close(logp.grad, expected)
    assert logp.grad[0, 1] != 0 and logp.grad[0, 3] != 0  # negative control


# ---------------------------------------------------------------- value loss

def test_value_loss_by_hand():
    #          V_old  V_new  R     clip(V)  (V-R)²  (clip-R)²  max   clip counted
    # tok 0:   1.0    1.5    2.0   1.2      0.25    0.64       0.64  yes
    # tok 1:   1.0    1.5    0.0   1.2      2.25    1.44       2.25  no
    # tok 2:   1.0    1.1    3.0   1.1      3.61    3.61       3.61  no (inside the range)
    # tok 3:   0.0   -0.5   -1.0  -0.2      0.25    0.64       0.64  yes
    # tok 4:   padding (huge numbers)
    old = t([[1.0, 1.0, 1.0, 0.0, 0.0]])
    new = t([[1.5, 1.5, 1.1, -0.5, 50.0]])
    ret = t([[2.0, 0.0, 3.0, -1.0, -50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(new, old, ret, mask, cliprange_value=0.2)
    close(loss, 0.5 * (0.64 + 2.25 + 3.61 + 0.64) / 4)  # 0.8925
    close(stats["vf_clipfrac"], 2 / 4)
    # the unclipped loss would be ½·(0.25 + 2.25 + 3.61 + 0.25)/4 = 0.795: clipping mattered
    assert abs(loss.item() - 0.795) > 0.05


def test_value_loss_without_clipping():
    # V_new == V_old: nothing to clip, loss = ½·mean((V - R)²)
    v = t([[1.0, -2.0, 0.5]])
    ret = t([[3.0, -1.0, 0.5]])
    loss, stats = value_loss(v, v.clone(), ret, torch.ones(1, 3), cliprange_value=0.2)
    close(loss, 0.5 * (4.0 + 1.0 + 0.0) / 3)  # 0.8333
    close(stats["vf_clipfrac"], 0.0)
    # with a range wide enough that no token is clipped: plain ½·mean((V_new - R)²)
    new = t([[1.5, -2.5, 0.5]])
    loss, stats = value_loss(new, v, ret, torch.ones(1, 3), cliprange_value=10.0)
    close(loss, 0.5 * (2.25 + 2.25 + 0.0) / 3)  # 0.75
    close(stats["vf_clipfrac"], 0.0)


# ---------------------------------------------------------------- explained variance

def test_explained_variance_perfect():
    ret = t([[1.0, 2.0, 4.0], [-1.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    close(explained_variance(ret.clone(), ret, mask), 1.0)


def test_explained_variance_constant_values_is_zero():
    ret = t([[1.0, 2.0, 3.0, 6.0]])
    vals = torch.full((1, 4), 2.5)
    # Var(R - c) = Var(R)  →  1 - 1 = 0
    out = explained_variance(vals, ret, torch.ones(1, 4))
    close(out, 0.0)
    assert out.item() <= 1e-6


def test_explained_variance_by_hand_and_masking():
    # R = [1,2,3,4], V = [1,2,3,3]: R - V = [0,0,0,1], mean 0.25,
    # Var = (3·0.0625 + 0.5625)/4 = 0.1875; Var(R) = 1.25; EV = 1 - 0.1875/1.25 = 0.85
    ret = t([[1.0, 2.0, 3.0, 4.0, 100.0]])
    vals = t([[1.0, 2.0, 3.0, 3.0, -100.0]])
    mask = t([[1, 1, 1, 1, 0]])
    close(explained_variance(vals, ret, mask), 0.85)
    # worse than a constant: R = [1,2,3], V = [3,2,1]: Var(R-V) = 8/3, Var(R) = 2/3 → 1 - 4 = -3
    close(explained_variance(t([[3.0, 2.0, 1.0, 7.0]]), t([[1.0, 2.0, 3.0, -7.0]]), t([[1, 1, 1, 0]])), -3.0)


def test_explained_variance_two_processes():
    # same 0.85 case split over two processes
    a, b = run_two_processes(explained_variance,
                             (t([[1.0, 2.0, 9.0]]), t([[1.0, 2.0, 0.0]]), t([[1, 1, 0]])),
                             (t([[3.0, 3.0, 9.0]]), t([[3.0, 4.0, 0.0]]), t([[1, 1, 0]])))
    close(a, 0.85)
    close(b, 0.85)


# ---------------------------------------------------------------- KL controller

def test_kl_controller_fixed_never_changes():
    ctl = KLController(0.05)
    for kl in (0.0, 1.0, 100.0, -3.0):
        assert ctl.update(kl, 512) == 0.05
    assert ctl.value == 0.05


def test_kl_controller_adaptive_clipped_up():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    # KL 60 ≫ 6: error = 9 → clipped to 0.2;  β = 0.1·(1 + 0.2·256/10000) = 0.1·1.00512
    assert ctl.update(60.0, 256) == pytest.approx(0.100512, rel=1e-12)
    assert ctl.value == pytest.approx(0.100512, rel=1e-12)
    # compounding: second update multiplies again
    assert ctl.update(60.0, 256) == pytest.approx(0.1 * 1.00512 ** 2, rel=1e-12)


def test_kl_controller_adaptive_clipped_down():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    # KL 0: error = -1 → clipped to -0.2;  β = 0.1·(1 - 0.2·256/10000) = 0.099488
    assert ctl.update(0.0, 256) == pytest.approx(0.099488, rel=1e-12)


def test_kl_controller_adaptive_linear_region():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    # KL 6.6: error = 6.6/6 - 1 = 0.1 (inside ±0.2);  β = 0.1·(1 + 0.1·256/10000) = 0.100256
    assert ctl.update(6.6, 256) == pytest.approx(0.100256, rel=1e-12)
    ctl = KLController(0.1, target=6.0, horizon=10000)
    # KL 5.7: error = -0.05;  β = 0.1·(1 - 0.05·1000/10000) = 0.0995
    assert ctl.update(5.7, 1000) == pytest.approx(0.0995, rel=1e-12)
    ctl = KLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(6.0, 1000) == pytest.approx(0.1, rel=1e-15)  # on target: unchanged
