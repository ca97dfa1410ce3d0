"""DPO on a tiny random-init model, starting from a short SFT run.

Full, LoRA and QLoRA train (step 0 is ln 2 with zero rewards, the loss falls, held-out reward
accuracy rises above chance, weights move); the reference is the model DPO starts from (a wrong
reference is caught at step 0, a LoRA SFT adapter is continued, adapter_disabled is refused on it,
precomputed log-probs work); the guards stop bad runs and bad inputs before training; a template
that differs from the SFT stage's is refused before any model is loaded; resume reproduces the
losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain import manifest
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from posttrain.stages import dpo, sft
from tests.conftest import read_losses
from tests.helpers import OTHER_TEMPLATE

LN2 = math.log(2)
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def _sft_config(tiny_dir, demo_data, out_root, **sft_section):
    """An SFT config for the module-scoped fixtures (make_config is per test); 10 short steps."""
    return validate_dict({
        "model": {"name_or_path": str(tiny_dir)},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}],
                         "eval": [{"path": str(demo_data / "sft_eval.jsonl")}]}},
        "output_dir": str(out_root),
        "seed": 0,
        "sft": sft_section,
    })


def _sft_training(lr: float) -> dict:
    return {"max_steps": 10, "per_device_train_batch_size": 16, "learning_rate": lr, "logging_steps": 5,
            "save_steps": 1000, "max_length": 64, "gradient_checkpointing": False}


@pytest.fixture(scope="module")
def sft_full(tiny_dir, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_sft_full")
    return sft.run(_sft_config(tiny_dir, demo_data, root, training=_sft_training(3e-3)), output=str(root / "sft"))


@pytest.fixture(scope="module")
def sft_lora(tiny_dir, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_sft_lora")
    cfg = _sft_config(tiny_dir, demo_data, root, method="lora", lora=LORA, training=_sft_training(2e-2))
    return sft.run(cfg, output=str(root / "sft"))


def _training(steps: int = 10, lr: float = 3e-3, **extra) -> dict:
    return {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": lr, "beta": 0.1,
            "max_length": 64, "gradient_checkpointing": False, "logging_steps": 2, "save_steps": 1000, **extra}


@pytest.fixture
def dpo_config(make_config, demo_data):
    """A DPO config on the demo pairs with the held-out pairs as eval; `training` keys override."""

    def build(training: dict | None = None, train_path=None, train_limit: int | None = None, **sections):
        train = {"path": str(train_path or demo_data / "pref_train.jsonl"), "limit": train_limit}
        pref = {"kind": "preference", "train": [train], "eval": [{"path": str(demo_data / "pref_eval.jsonl")}]}
        return make_config(dpo__training=training or _training(), dpo__lora=LORA, data__preference=pref, **sections)

    return build


def _assert_step0_is_reference(step0: dict) -> None:
    """Before any update policy == reference: log-ratios 0, sigmoid loss ln 2."""
    assert step0 is not None
    assert step0["loss"] == pytest.approx(LN2, abs=1e-3)
    assert abs(step0["rewards/chosen"]) < 1e-4, step0
    assert abs(step0["rewards/rejected"]) < 1e-4, step0


class ModelLoaded(AssertionError):
    """Raised by a patched load_causal_lm: proves a run got as far as loading the model."""


def _no_model_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise ModelLoaded("load_causal_lm was called")

    monkeypatch.setattr("posttrain.models.load_causal_lm", refuse)


# ---------------------------------------------------------------------------------------------
# Training: full, LoRA, QLoRA


@pytest.mark.parametrize(("method", "lr", "reference"), [
    ("full", 3e-3, "frozen copy of the starting model"),
    ("lora", 3e-2, "frozen copy of the new, zero-initialised adapter (= the starting model)"),
    ("qlora", 3e-2, "frozen copy of the new, zero-initialised adapter (= the starting model)"),
])
def test_dpo_trains_from_sft(dpo_config, sft_full, tmp_path, method, lr, reference):
    out = dpo.run(dpo_config(_training(lr=lr), dpo__method=method), base=str(sft_full), output=str(tmp_path / "dpo"))
    m = manifest.read(out)
    assert m["stage"] == "dpo" and m["method"] == method and m["reference"] == reference
    assert m["loss_type"] == ["sigmoid"] and m["beta"] == 0.1
    assert m["parent"]["path"] == str(sft_full) and m["parent"]["stage"] == "sft"
    assert m["adapter_base"] == (None if method == "full" else str(sft_full))
    metrics = m["metrics"]
    assert metrics["steps"] == 10 and metrics["held_out"] is True

    # step 0: the reference (a frozen copy of the SFT model) is the policy
    step0, after = metrics["step0"], metrics["after"]
    _assert_step0_is_reference(step0)

    # the training loss falls from ~ln 2
    losses = list(read_losses(out).values())
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert losses[0] <= LN2 + 1e-3
    assert losses[0] - losses[-1] > 0.05, losses

    # held-out pairs: the policy now prefers chosen over rejected
    assert metrics["reward_accuracy"] == after["rewards/accuracies"]
    assert after["rewards/accuracies"] > 0.5 and after["rewards/accuracies"] > step0["rewards/accuracies"]
    assert metrics["reward_margin"] > 0
    assert after["loss"] < step0["loss"] - 0.05
    assert after["logps/rejected"] < step0["logps/rejected"]

    # the parameters moved away from the SFT model's
    if method == "full":
        before, trained = load_file(str(sft_full / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert trained.keys() == before.keys()
        unchanged = [k for k in before if torch.equal(before[k], trained[k])]
        assert not unchanged, f"full DPO left these tensors unchanged: {unchanged}"
        assert m["trainable_parameters"] == m["total_parameters"]
    else:
        assert not (out / "model.safetensors").exists()
        assert not (out / "ref").exists(), "TRL's reference adapter copy is not an output"
        adapter = load_file(str(out / "adapter_model.safetensors"))
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "a new adapter starts with B = 0 and must move"
        assert 0 < m["trainable_parameters"] < m["total_parameters"]


# ---------------------------------------------------------------------------------------------
# The reference is the starting model


def test_wrong_reference_is_caught_at_step0(dpo_config, sft_full, tiny_dir, tmp_path, monkeypatch):
    """Negative control: a reference that is the pre-SFT base, not the SFT model DPO starts from."""
    from transformers import AutoModelForCausalLM

    def pre_sft_reference(model, method, mode, continues_adapter):
        ref = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
        ref.requires_grad_(False)
        return ref, "frozen copy of the starting model"

    monkeypatch.setattr("posttrain.stages.dpo.reference_model", pre_sft_reference)
    out = tmp_path / "dpo"
    with pytest.raises(PosttrainError, match=r"at step 0 the policy and the reference disagree") as e:
        dpo.run(dpo_config(), base=str(sft_full), output=str(out))
    assert "\n" not in str(e.value)
    assert not manifest.is_finished(out)
    assert not read_losses(out), "no training step may run after a failed step-0 check"


def test_lora_dpo_continues_lora_sft_adapter(dpo_config, sft_lora, tiny_dir, tmp_path):
    """From a LoRA SFT adapter, DPO (lora) trains that adapter further; the reference is a frozen
    copy of it (step 0 ≈ 0), never the pre-SFT base."""
    out = dpo.run(dpo_config(_training(steps=4, lr=5e-3), dpo__method="lora"), base=str(sft_lora),
                  output=str(tmp_path / "dpo"))
    m = manifest.read(out)
    _assert_step0_is_reference(m["metrics"]["step0"])
    assert m["reference"] == "frozen copy of the starting (SFT) adapter"
    assert m["adapter_base"] == str(tiny_dir), "the DPO adapter sits on the SFT adapter's base"
    assert not (out / "ref").exists()

    start = load_file(str(sft_lora / "adapter_model.safetensors"))
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert trained.keys() == start.keys()
    b_keys = [k for k in start if "lora_B" in k]
    moved = sum(float((trained[k] - start[k]).norm()) for k in b_keys)
    size = sum(float(start[k].norm()) for k in b_keys)
    assert moved > 0, "DPO did not change the adapter"
    # a fresh adapter would end far from the SFT adapter (B starts at 0); a continued one stays near it
    assert moved < 0.5 * size, f"the DPO adapter is not the SFT adapter trained further ({moved:.3f} vs {size:.3f})"


def test_adapter_disabled_on_sft_adapter_is_refused(dpo_config, sft_lora, tmp_path, monkeypatch):
    """Disabling the adapter of a LoRA SFT start would make the pre-SFT base the reference."""
    _no_model_loading(monkeypatch)
    out = tmp_path / "dpo"
    with pytest.raises(PosttrainError, match=r"adapter_disabled.*pre-SFT base"):
        dpo.run(dpo_config(dpo__method="lora", dpo__reference="adapter_disabled"), base=str(sft_lora), output=str(out))
    assert not manifest.is_finished(out)


def test_precomputed_reference(dpo_config, sft_full, tmp_path):
    # precomputing the reference log-probs of every pair is the slow part: 32 pairs
    cfg = dpo_config(_training(steps=4), train_limit=32, dpo__reference="precomputed")
    out = dpo.run(cfg, base=str(sft_full), output=str(tmp_path / "dpo"))
    m = manifest.read(out)
    assert m["reference"] == "precomputed log-probs of the starting model"
    assert m["metrics"]["steps"] == 4
    step0, after = m["metrics"]["step0"], m["metrics"]["after"]
    _assert_step0_is_reference(step0)
    assert after["loss"] < step0["loss"] and after["rewards/margins"] > 0


# ---------------------------------------------------------------------------------------------
# Guards


def test_collapsing_loss_is_loud(dpo_config, sft_full, tmp_path):
    """A learning rate far too high drives the loss to ~0 within a few steps: stop, no manifest."""
    out = tmp_path / "dpo"
    with pytest.raises(PosttrainError, match=r"the DPO loss fell to .* it collapsed instead of learning") as e:
        dpo.run(dpo_config(_training(lr=1.0, logging_steps=1)), base=str(sft_full), output=str(out))
    assert "\n" not in str(e.value)
    assert not manifest.is_finished(out)


def test_pairs_with_chosen_equal_rejected_fail_before_training(dpo_config, sft_full, demo_data, tmp_path,
                                                                 monkeypatch):
    rows = [json.loads(line) for line in (demo_data / "pref_train.jsonl").read_text().splitlines()]
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows))
    _no_model_loading(monkeypatch)
    out = tmp_path / "dpo"
    with pytest.raises(PosttrainError, match=r"chosen == rejected") as e:
        dpo.run(dpo_config(train_path=same), base=str(sft_full), output=str(out))
    assert "\n" not in str(e.value)
    assert not out.exists(), "nothing may be written before the data is known to be usable"


def test_preference_data_without_rejected_column(dpo_config, sft_full, demo_data, tmp_path, monkeypatch):
    rows = [json.loads(line) for line in (demo_data / "pref_train.jsonl").read_text().splitlines()]
    no_rejected = tmp_path / "chosen_only.jsonl"
    no_rejected.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "rejected"}) + "\n" for r in rows))
    _no_model_loading(monkeypatch)
    with pytest.raises(PosttrainError, match=r"'rejected'"):
        dpo.run(dpo_config(train_path=no_rejected), base=str(sft_full), output=str(tmp_path / "dpo"))


@pytest.mark.parametrize(("case", "message"), [
    ("checkpoints_no_manifest", r"unfinished stage"),
    ("started_no_checkpoints", r"unfinished stage"),
    ("empty", r"holds no model"),
])
def test_base_that_is_not_a_finished_stage_is_refused(dpo_config, sft_full, tmp_path, monkeypatch, case, message):
    """--base must be a finished stage. Not one: an SFT dir interrupted mid-training (checkpoints,
    no posttrain.json); an SFT dir with its weights and started marker but no posttrain.json and no
    checkpoints (a run with save_strategy: no killed while saving, or its checkpoints deleted);
    an empty directory."""
    base = tmp_path / "base"
    if case == "empty":
        base.mkdir()
    else:
        shutil.copytree(sft_full, base)
        (base / manifest.MANIFEST).unlink()
        assert (base / "posttrain.started.json").is_file() and (base / "model.safetensors").is_file()
        if case == "started_no_checkpoints":
            shutil.rmtree(base / "checkpoints")
        else:
            assert any((base / "checkpoints").glob("checkpoint-*"))
    _no_model_loading(monkeypatch)
    out = tmp_path / "dpo"
    with pytest.raises(PosttrainError, match=message):
        dpo.run(dpo_config(), base=str(base), output=str(out))
    assert not manifest.is_finished(out)


# ---------------------------------------------------------------------------------------------
# Cross-stage template check



@pytest.mark.parametrize("allow", [False, True])
def test_template_mismatch_with_sft_stage(dpo_config, sft_full, tmp_path, monkeypatch, allow):
    template = tmp_path / "other.jinja"
    template.write_text(OTHER_TEMPLATE)
    _no_model_loading(monkeypatch)
    cfg = dpo_config(template={"name": str(template)}, dpo__allow_template_mismatch=allow)
    out = tmp_path / "dpo"
    if allow:
        # past the check (and the data checks with the new template) up to loading the model
        with pytest.raises(ModelLoaded):
            dpo.run(cfg, base=str(sft_full), output=str(out))
    else:
        with pytest.raises(PosttrainError, match=r"another template: the chat template renders differently.*"
                                                 r"allow_template_mismatch") as e:
            dpo.run(cfg, base=str(sft_full), output=str(out))
        assert "\n" not in str(e.value)
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_reproduces_losses(dpo_config, sft_full, tmp_path):
    cfg = dpo_config(_training(steps=6, logging_steps=1, save_steps=3, save_total_limit=5))
    out = dpo.run(cfg, base=str(sft_full), output=str(tmp_path / "dpo"))
    full = read_losses(out)
    assert sorted(full) == list(range(1, 7))
    assert full[1] == pytest.approx(LN2, abs=1e-4)

    # Interrupt after step 3: drop what came later, as a killed run would have left it.
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    (out / manifest.MANIFEST).unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 3))

    dpo.run(cfg, base=str(sft_full), output=str(out), resume=True)
    m = manifest.read(out)
    assert m["resumed_from"].endswith("checkpoint-3")
    assert m["metrics"]["step0"] is None and m["metrics"]["steps"] == 6
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == [1, 2, 3, 4, 5, 6], "the resumed run must continue at step 4, not start over"
    resumed = read_losses(out)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_dpo_without_a_config_uses_the_config_recorded_in_the_base(sft_full, tmp_path, monkeypatch):
    """`posttrain dpo --base DIR`: the config comes from DIR/posttrain.json (with --set on top);
    a recorded config without preference data is a clear error before any model is loaded."""
    from posttrain.cli import _load
    from posttrain.config import to_dict

    recorded = manifest.read(sft_full)["config"]
    cfg = _load(None, [f"output_dir={tmp_path}", "dpo.training.beta=0.3"], base=str(sft_full))
    assert to_dict(cfg)["sft"] == recorded["sft"] and to_dict(cfg)["model"] == recorded["model"]
    assert cfg.dpo.training == {"beta": 0.3} and cfg.output_dir == str(tmp_path)
    _no_model_loading(monkeypatch)
    with pytest.raises(PosttrainError, match=r"data\.preference"):
        dpo.run(cfg, base=str(sft_full))
    assert not (tmp_path / "dpo").exists()


# The step-0 guard on its own (issue 17 (f)): each threshold at 0.9× passes, at 1.1× stops


def _step0_args(beta: float = 0.1, loss_type=("sigmoid",)):
    from types import SimpleNamespace

    return SimpleNamespace(beta=beta, loss_type=list(loss_type))


def _step0_metrics(loss: float = math.log(2), chosen: float = 0.0, rejected: float = 0.0) -> dict:
    return {"loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected}


@pytest.mark.parametrize("beta,tolerance", [(0.1, 0.02), (0.5, 0.05)])
@pytest.mark.parametrize("key", ["rewards/chosen", "rewards/rejected"])
@pytest.mark.parametrize("sign", [1, -1])
def test_step0_guard_on_the_log_ratio(beta, tolerance, key, sign):
    """rewards/β is the mean log-ratio: allowed up to dpo.step0_tolerance (either pair side, either sign)."""
    args = _step0_args(beta)
    limit = tolerance * beta  # the reward at which |log-ratio| = tolerance
    inside = _step0_metrics(**{key.split("/")[1]: sign * 0.9 * limit})
    dpo.check_step0(inside, args, tolerance)
    outside = _step0_metrics(**{key.split("/")[1]: sign * 1.1 * limit})
    with pytest.raises(PosttrainError, match=r"at step 0 the policy and the reference disagree"):
        dpo.check_step0(outside, args, tolerance)


@pytest.mark.parametrize("beta,tolerance", [(0.1, 0.02), (0.5, 0.05)])
@pytest.mark.parametrize("sign", [1, -1])
def test_step0_guard_on_the_loss_alone(beta, tolerance, sign):
    """With rewards exactly 0 the sigmoid loss must still be ln 2: allowed off by 10·tolerance·β + 1e-3
    (the ln 2 part of the guard on its own); other loss types have no ln 2 to check."""
    args = _step0_args(beta)
    limit = 10 * tolerance * beta + 1e-3
    dpo.check_step0(_step0_metrics(loss=math.log(2) + sign * 0.9 * limit), args, tolerance)
    off = _step0_metrics(loss=math.log(2) + sign * 1.1 * limit)
    with pytest.raises(PosttrainError, match=r"at step 0 the DPO loss is .*not ln 2"):
        dpo.check_step0(off, args, tolerance)
    dpo.check_step0(off, _step0_args(beta, ("ipo",)), tolerance)  # not a sigmoid loss: no ln 2 expected
