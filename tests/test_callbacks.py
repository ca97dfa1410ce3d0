"""posttrain.callbacks: the trainer callbacks every stage installs. TrainingGuard stops on a
non-finite loss (safeguard #8); its cross-process check stops processes whose weights differ;
DPOGuard stops DPO on a zero gradient norm or an early collapse (#8, #25).

The frozen-model check at the start of training runs through a real SFT stage in
test_safeguards.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.errors import PosttrainError
from tests.helpers import trainer_state as _state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_training_guard_stops_on_a_non_finite_loss(bad):
    from posttrain.callbacks import TrainingGuard

    guard = TrainingGuard(torch.nn.Linear(2, 2))
    guard.on_log(None, _state(3), None, logs={"loss": 1.5, "grad_norm": float("nan")})  # finite loss: fine
    with pytest.raises(PosttrainError, match=rf"training loss became {bad} at step 3"):
        guard.on_log(None, _state(3), None, logs={"loss": bad})


def _agree(rank: int, port: int, perturb: bool, results) -> None:
    import torch
    import torch.distributed as dist

    from posttrain.callbacks import check_processes_agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    if perturb and rank == 1:  # one process's copy moved on its own
        with torch.no_grad():
            model.weight[0, 0] += 1e-3
    try:
        check_processes_agree(model, "after the first optimizer step")
        results.put((rank, None))
    except PosttrainError as e:
        results.put((rank, str(e)))
    dist.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True])
def test_processes_that_hold_different_weights_are_stopped(perturb):
    """TrainingGuard's cross-process check, in two real gloo processes: identical copies pass;
    a copy that differs in one weight by 1e-3 stops both processes with one line."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(rank, port, perturb, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    if not perturb:
        assert got == {0: None, 1: None}
    else:
        assert all(got[r] and "hold different weights" in got[r] and "\n" not in got[r] for r in (0, 1)), got


def test_dpo_guard_stops_on_a_zero_gradient_norm():
    from posttrain.callbacks import DPOGuard

    guard = DPOGuard(SimpleNamespace(max_steps=10), 0.01)
    guard.on_log(None, _state(2), None, logs={"loss": 0.69, "grad_norm": 0.3})
    with pytest.raises(PosttrainError, match=r"the gradient norm is 0 at step 2: nothing is learning"):
        guard.on_log(None, _state(2), None, logs={"loss": 0.69, "grad_norm": 0.0})


def test_dpo_guard_collapse_only_within_the_first_steps():
    from posttrain.callbacks import DPOGuard

    guard = DPOGuard(SimpleNamespace(max_steps=1000), 0.01)
    assert guard.early == 50  # 5% of a long run
    with pytest.raises(PosttrainError, match=r"the DPO loss fell to 0\.001 by step 50: it collapsed"):
        guard.on_log(None, _state(50), None, logs={"loss": 0.001})
    guard.on_log(None, _state(51), None, logs={"loss": 0.001})  # late in a run a low loss is learning
    guard.on_log(None, _state(5), None, logs={"loss": 0.02})  # above collapse_loss
