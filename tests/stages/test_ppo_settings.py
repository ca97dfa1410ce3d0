"""Issue 17 (c, d): the configured PPO settings reach the arithmetic of a real iteration.

One Loop.step on the tiny model (policy, a perturbed reference so the KL penalty is not zero, a
value head and a reward model), with spies on posttrain.rl.core: the per-token rewards carry the
configured β, the advantages the update receives are the whitened GAE of those rewards with the
configured γ and λ (recomputed here by a plain loop), and the clipped losses get the configured
clip ranges. Every setting is set away from its default, so code that ignores it (a hard-coded
0.95, no whitening) gives other numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.rl import core, rollout

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"gamma": 0.9, "lam": 0.7, "cliprange": 0.13, "cliprange_value": 0.17, "kl_coef": 0.07}


def _ppo_loop(tiny_dir, make_config, tmp_path, **settings):
    """A Loop in-process on the tiny model (as tests/rl/test_logprobs.py builds it), without ptx,
    with a reference that is the policy plus noise (the KL penalty then moves the rewards)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from posttrain import demo, models
    from posttrain.sections import PPOStageConfig
    from posttrain.stages import ppo

    cfg = make_config()
    tok = models.load_tokenizer(cfg, str(tiny_dir))
    pc = PPOStageConfig(batch_size=4, mini_batch_size=2, max_new_tokens=6, ppo_epochs=1, **settings)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, dtype=torch.float32).eval()
    scorer.config.pad_token_id = tok.tokenizer.pad_token_id
    value = rollout.ValueModel(copy.deepcopy(scorer).requires_grad_(True))
    rows = demo.make_rows(seed=0)["sft_train"][:8]
    queries, _ = ppo._tokenize_prompts({"prompt": [r["messages"][:-1] for r in rows]}, tok.tokenizer, 64)
    accelerator = Accelerator(cpu=True)
    model = rollout.PolicyAndValue(policy, value)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    return ppo.Loop(cfg, pc, accelerator, model, optimizer, reference, scorer, tok, queries, tmp_path)


def _gae_by_hand(rewards, values, mask, gamma, lam):
    """A_t = Σ_k (γλ)^k δ_{t+k} over the real tokens, V = 0 after the last; plain Python."""
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        n = int(mask[i].sum())
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist() + [0.0]
        running = 0.0
        for t in reversed(range(n)):
            running = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * running
            adv[i, t] = running
    return adv


def _whiten_by_hand(x, mask):
    real = x[mask.bool()].double()
    return ((x.double() - real.mean()) / real.std(unbiased=True)).float() * mask


@pytest.fixture(scope="module")
def iteration(tiny_dir, demo_data, tmp_path_factory):
    """One PPO iteration with every setting off its default, and what the spies saw."""
    from posttrain.config import validate_dict
    from posttrain.stages import ppo

    def make_config():
        return validate_dict({"model": {"name_or_path": str(tiny_dir)},
                              "data": {"sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}]}},
                              "output_dir": str(tmp_path_factory.mktemp("ppo_settings")), "seed": 0})

    seen: dict[str, list] = {k: [] for k in ("rewards", "gae", "whiten", "policy", "value", "update")}
    originals = {n: getattr(core, n) for n in ("per_token_rewards", "gae", "masked_whiten", "policy_loss",
                                               "value_loss")}
    update = ppo.Loop.update

    def spy(name, key):
        def wrapped(*args, **kwargs):
            out = originals[name](*args, **kwargs)
            seen[key].append((args, kwargs, out))
            return out
        return wrapped

    def spy_update(self, it, batch, old_logp, old_values, advantages, returns):
        seen["update"].append({"mask": batch.mask.float().clone(), "old_values": old_values.clone(),
                               "advantages": advantages.clone(), "returns": returns.clone()})
        return update(self, it, batch, old_logp, old_values, advantages, returns)

    with pytest.MonkeyPatch.context() as mp:
        for name, key in (("per_token_rewards", "rewards"), ("gae", "gae"), ("masked_whiten", "whiten"),
                          ("policy_loss", "policy"), ("value_loss", "value")):
            mp.setattr(core, name, spy(name, key))
        mp.setattr(ppo.Loop, "update", spy_update)
        loop = _ppo_loop(tiny_dir, make_config, tmp_path_factory.mktemp("ppo_loop"), **SETTINGS)
        torch.manual_seed(1)
        stats, _ = loop.step(1)  # iteration 2: past the step-0 checks (the reference is perturbed)
    return loop.pc, stats, seen


def _arg(call, index: int, name: str):
    args, kwargs, _ = call
    return kwargs[name] if name in kwargs else args[index]


def test_the_configured_settings_are_not_the_defaults():
    from posttrain.sections import PPOStageConfig

    defaults = PPOStageConfig()
    for k, v in SETTINGS.items():
        assert getattr(defaults, k) != v, k


def test_rewards_carry_the_configured_kl_coefficient(iteration):
    pc, stats, seen = iteration
    assert len(seen["rewards"]) == 1
    (scores, logp, ref_logp, mask, kl_coef), kwargs, (rewards, kl) = seen["rewards"][0]
    assert not kwargs and kl_coef == pc.kl_coef == SETTINGS["kl_coef"]
    assert float(kl.abs().sum()) > 1e-3, "the KL penalty should move the rewards here"
    expected = -SETTINGS["kl_coef"] * (logp - ref_logp) * mask
    last = mask.sum(1).long() - 1
    expected[torch.arange(len(last)), last] += scores
    torch.testing.assert_close(rewards, expected, rtol=1e-6, atol=1e-7)
    assert stats["kl_coef"] == pytest.approx(SETTINGS["kl_coef"])


def test_update_gets_whitened_gae_with_the_configured_gamma_and_lambda(iteration):
    pc, _, seen = iteration
    assert len(seen["gae"]) == 1 and len(seen["update"]) == 1
    assert _arg(seen["gae"][0], 3, "gamma") == SETTINGS["gamma"]
    assert _arg(seen["gae"][0], 4, "lam") == SETTINGS["lam"]
    rewards = seen["rewards"][0][2][0]
    fed = seen["update"][0]
    mask, values = fed["mask"], fed["old_values"]
    assert (mask.sum(1) > 1).all()  # λ matters only over more than one token

    raw = _gae_by_hand(rewards, values, mask, SETTINGS["gamma"], SETTINGS["lam"])
    torch.testing.assert_close(fed["returns"], (raw + values) * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fed["advantages"], _whiten_by_hand(raw, mask), rtol=1e-4, atol=1e-5)
    # whitened over the real tokens, zero on padding
    real = fed["advantages"][mask.bool()]
    assert abs(float(real.mean())) < 1e-5 and float(real.std()) == pytest.approx(1.0, abs=1e-4)
    assert float((fed["advantages"] * (1 - mask)).abs().max()) == 0.0
    # the defaults would have given other advantages: the test can tell the settings apply
    for gamma, lam in ((1.0, 0.95), (SETTINGS["gamma"], 0.95), (1.0, SETTINGS["lam"])):
        other = _whiten_by_hand(_gae_by_hand(rewards, values, mask, gamma, lam), mask)
        assert float((other - fed["advantages"]).abs().max()) > 1e-2, (gamma, lam)


def test_losses_get_the_configured_clip_ranges_and_the_whitened_advantages(iteration):
    pc, _, seen = iteration
    fed = seen["update"][0]
    assert len(seen["policy"]) == len(seen["value"]) == 2  # batch 4, mini-batch 2, one epoch
    for call in seen["policy"]:
        assert _arg(call, 4, "cliprange") == SETTINGS["cliprange"]
        adv = _arg(call, 2, "advantages")
        # each micro-batch's advantages are rows of the whitened advantages the update received
        assert any(torch.equal(adv[0], row) for row in fed["advantages"])
    for call in seen["value"]:
        assert _arg(call, 4, "cliprange_value") == SETTINGS["cliprange_value"]
        ret = _arg(call, 2, "returns")
        assert any(torch.equal(ret[0], row) for row in fed["returns"])
