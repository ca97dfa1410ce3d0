"""Reinforcement learning from a reward: shared by the ppo, rloo and grpo stages.

    prompts.py   prompts (and reference answers) from any formatted dataset
    rewards.py   reward models and reward functions: loading, the weak-model gate, the tokenizer
                 preflight, scoring token sequences
    core.py      PPO's arithmetic (per-token rewards, GAE, whitening, clipped losses, adaptive KL),
                 pure torch, each piece tested against hand-computed numbers
    rollout.py   sampling responses and the log-probs/values of prompt+response in one pass
"""
