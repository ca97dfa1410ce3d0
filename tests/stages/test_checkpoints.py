"""stages/checkpoints.py: posttrain's PPO checkpoint format (save_ppo / load_ppo) round-trips the
weights, the optimizer, the random state and the trainer state; rotation keeps the newest and the
best; what the manifest records and what a resume picks read that format. CPU, a one-layer model
and a single-process stand-in for the Accelerator."""

from __future__ import annotations

import copy
import json

import torch

from posttrain.stages import checkpoints


class OneProcess:
    """The part of accelerate's Accelerator the checkpoint format uses, for one process."""
    is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model):
        return model


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(out, model, optimizer, it: int, reward: float, best=(None, None), limit: int = 2):
    state = {"global_step": it, "kl_coef": 0.1, "log_history": [{"step": it, "reward": reward}]}
    return checkpoints.save_ppo(OneProcess(), model, optimizer, out, it, state, reward=reward, best=best, limit=limit)


def test_a_ppo_checkpoint_restores_weights_optimizer_and_random_state(tmp_path):
    model, optimizer = _trained()
    best = _save(tmp_path, model, optimizer, 5, 0.3)
    d = tmp_path / checkpoints.CHECKPOINTS / "checkpoint-5"
    assert best == (str(d), 0.3)
    assert sorted(p.name for p in d.iterdir()) == ["model.safetensors", "optimizer.pt", "rng_0.pth",
                                                   "trainer_state.json"]
    state = json.loads((d / "trainer_state.json").read_text())
    assert state == {"global_step": 5, "kl_coef": 0.1, "log_history": [{"step": 5, "reward": 0.3}],
                     "best_model_checkpoint": str(d), "best_metric": 0.3}
    next_draw = torch.rand(3)  # the random stream right after the save
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict()["state"])

    model(torch.randn(2, 4)).sum().backward()  # the run goes on past the checkpoint
    optimizer.step()
    assert not torch.equal(model.weight, weights["weight"])

    assert checkpoints.load_ppo(OneProcess(), model, optimizer, d) == state
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    restored = optimizer.state_dict()["state"]
    assert all(torch.equal(restored[i][k], moments[i][k]) for i in moments for k in moments[i])
    assert torch.equal(torch.rand(3), next_draw)
    assert checkpoints.last_checkpoint(tmp_path) == d
    assert checkpoints.checkpoints_record(tmp_path) == {"kept": ["checkpoint-5"], "best": "checkpoint-5",
                                                        "best_metric": 0.3}


def test_ppo_rotation_keeps_the_newest_and_the_highest_reward(tmp_path):
    model, optimizer = _trained()
    best = (None, None)
    for it, reward in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2)]:
        best = _save(tmp_path, model, optimizer, it, reward, best)
    assert [p.name for p in checkpoints.sorted_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert checkpoints.checkpoints_record(tmp_path) == {"kept": ["checkpoint-2", "checkpoint-4"],
                                                        "best": "checkpoint-2", "best_metric": 0.9}
    # a checkpoint whose trainer_state.json was never written (killed while saving) is not resumed from
    (tmp_path / checkpoints.CHECKPOINTS / "checkpoint-6").mkdir()
    assert checkpoints.last_checkpoint(tmp_path).name == "checkpoint-4"


def test_truncate_after_drops_the_log_lines_past_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "kl": 0.0}) + "\n" for s in (1, 2, 3, 4)))
    checkpoints.truncate_after(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    checkpoints.truncate_after(tmp_path / "samples.jsonl", 2)  # no such log: nothing to do
    assert not (tmp_path / "samples.jsonl").exists()
