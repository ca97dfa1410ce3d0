"""Reinforcement learning from a reward: shared by the ppo, rloo and grpo stages.

    prompts.py   prompts (and reference answers) from any formatted dataset
    rewards.py   reward models and reward functions: loading, the weak-model gate, the tokenizer
                 preflight, scoring token sequences
    core.py      PPO's arithmetic (per-token rewards, GAE, whitening, clipped losses, adaptive KL),
                 pure torch, each piece tested against hand-computed numbers
    rollout.py   sampling responses and the log-probs/values of prompt+response in one pass
    logprobs.py  per-token log-probs, entropies and KLs from hidden states, the LM head applied to a
                 chunk of positions at a time (a 262k vocabulary's full logits are gigabytes)
"""
