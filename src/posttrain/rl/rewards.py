"""Rewards for the RL stages: reward models (sequence classifiers with one output) and reward
functions (`module:function`).

Before anything is loaded, an RL stage
  - refuses a reward model whose recorded held-out accuracy is below the gate (a weak reward
    model is exploited: its score rises while quality falls), unless told to go ahead;
  - checks that the policy and the reward model share tokenizer, chat template and special
    tokens (the reward model would otherwise score text it never saw rendered that way).

`python -m posttrain.rl.rewards DIR IDS.json` scores token sequences with a saved reward model in a
fresh process (the reward stage uses it to prove that what it saved reloads to the same scores).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

from posttrain import manifest, models, templates
from posttrain.console import console
from posttrain.errors import PosttrainError
from posttrain.sections import RewardGate


def resolve_reward_model(path: str, stage: str) -> str:
    """A reward model directory must be a finished reward stage (or a plain model directory)."""
    p = Path(path)
    if not p.exists():
        raise PosttrainError(f"{stage}: reward model '{path}' does not exist",
                             fix="run `posttrain reward` first (or add reward to stages), or set the reward model path")
    m = manifest.read(p)
    if m is None and ((p / "posttrain.started.json").exists() or (p / "checkpoints").is_dir()):
        raise PosttrainError(f"{stage}: reward model '{path}' is an unfinished reward stage (no posttrain.json)",
                             fix="finish it: posttrain reward --resume")
    if m is not None and m.get("stage") != "reward":
        raise PosttrainError(f"{stage}: '{path}' is a {m.get('stage')} stage, not a reward model",
                             fix="point the reward model at a reward stage's output")
    return path


def check_gate(path: str, gate: RewardGate, stage: str) -> float | None:
    """Refuse a reward model whose recorded held-out accuracy is under the gate. Returns the accuracy."""
    m = manifest.read(path) or {}
    acc = m.get("metrics", {}).get("accuracy")
    where = "held-out" if m.get("metrics", {}).get("held_out") else "training-sample"
    if acc is None:
        msg = f"reward model '{path}' has no recorded accuracy (not a posttrain reward stage)"
    elif acc < gate.min_reward_accuracy:
        msg = (f"reward model '{path}' has {where} pairwise accuracy {acc:.3f}, under {stage}.min_reward_accuracy "
               f"{gate.min_reward_accuracy}: {stage} would learn to exploit it")
    else:
        return acc
    if gate.allow_weak_reward_model:
        console.print(f"[yellow]warning[/] {msg} (going ahead: {stage}.allow_weak_reward_model)")
        return acc
    raise PosttrainError(msg, fix=f"train a better reward model, or set {stage}.allow_weak_reward_model: true")


def check_same_tokenizer(tok: models.TokenizerInfo, rm_path: str, stage: str) -> None:
    """The reward model reads exactly the tokens the policy writes: same vocabulary, chat template
    (rendered) and special tokens. Uses the tokenizer saved with the reward model; no weights load."""
    from transformers import AutoTokenizer

    try:
        rm_tok = AutoTokenizer.from_pretrained(rm_path)
    except (OSError, ValueError) as e:
        raise PosttrainError(f"{stage}: could not load the reward model's tokenizer from '{rm_path}': "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    t = tok.tokenizer
    problems = []
    if rm_tok.get_vocab() != t.get_vocab():
        problems.append(f"vocabularies differ ({len(rm_tok)} vs {len(t)} tokens)")
    if not rm_tok.chat_template:
        problems.append("the reward model's tokenizer has no chat template")
    elif templates.template_hash(rm_tok, rm_tok.chat_template) != tok.template_hash:
        problems.append("the chat templates render differently")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(rm_tok, name) != getattr(t, name):
            problems.append(f"{name.removesuffix('_id')} differs ({getattr(rm_tok, name)} vs {getattr(t, name)})")
    if problems:
        raise PosttrainError(
            f"{stage}: the policy and the reward model '{rm_path}' do not share a tokenizer: {'; '.join(problems)}",
            fix="train the reward model from the same SFT stage (reward.init unset) with the same template",
        )


def load_function(spec: str, search_dir: str | None):
    """Import `module:function` from the config's directory or from installed packages only."""
    module_name, _, fn_name = spec.partition(":")
    candidate = Path(search_dir, *module_name.split(".")).with_suffix(".py") if search_dir else None
    try:
        if candidate is not None and candidate.is_file():
            spec_ = importlib.util.spec_from_file_location(f"posttrain_rewards_{module_name}", candidate)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        where = f"'{candidate}' or an installed module" if candidate else "an installed module"
        raise PosttrainError(f"reward function '{spec}': no module '{e.name}' ({where})",
                             fix="put the .py file next to the config, or install the package") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise PosttrainError(f"reward function '{spec}': module '{module_name}' has no function '{fn_name}'")
    return fn


def load_reward_model(path: str, dtype=None, *, method: str | None = None, model_dtype: str | None = None,
                      full_precision: bool = False):
    """A saved reward model, frozen, in eval mode. A LoRA reward adapter is merged in memory; a
    QLoRA one is applied to its base quantized to 4 bits as in training (merging it into full
    precision weights would change its scores by the quantization error). `method` and `model_dtype`
    (the config's model.dtype) default to what the stage's manifest recorded."""
    import torch
    from transformers import AutoModelForSequenceClassification

    base = models.adapter_base(path)
    kwargs = {"num_labels": 1, "dtype": dtype or torch.float32}
    if base:
        from peft import PeftModel

        check_head_saved(path)
        recorded = manifest.read(path) or {}
        quantized = (method or recorded.get("method")) == "qlora" and not full_precision
        if quantized:
            compute = models.torch_dtype(model_dtype
                                         or recorded.get("config", {}).get("model", {}).get("dtype", "auto"))
            kwargs.update(dtype=compute, quantization_config=models.bnb_config(compute))
        model = AutoModelForSequenceClassification.from_pretrained(base, **kwargs)
        _as_trained(model, path)
        if quantized:
            models.disable_bnb_cpu_repack(model)
            model = PeftModel.from_pretrained(model, path)
        else:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        raise PosttrainError(f"reward model '{path}' has no pad_token_id in its config; scores of padded batches "
                             "would be read at the wrong position")
    model.eval().requires_grad_(False)
    return model


def _as_trained(model, path: str) -> None:
    """The base under a reward adapter, set up as the reward stage trained on it: the pad id the
    score is read by (the stage's tokenizer, saved with the adapter: the base's config.json may
    name another pad, e.g. the eos token posttrain refuses to pad with) and the vocabulary (rows
    for tokens the stage added). Adapters saved without a tokenizer keep the base's settings."""
    if not (Path(path) / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    if tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id


def check_head_saved(path: str | Path) -> None:
    """Safeguard #9: a LoRA reward model's trained head must be in the adapter file."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
        if not any(".score." in k or k.endswith("score.weight") for k in f.keys()):
            raise PosttrainError(f"the adapter saved in '{path}' has no score head: the reward model would load "
                                 "with a random head", fix="keep score in lora.modules_to_save and retrain")


def check_pad(model, pad_id: int, path: str, stage: str) -> None:
    """The reward model reads its score at the last token that is not its config's pad_token_id, and
    score_ids pads its inputs with `pad_id` (the tokenizer's): if the two differ, every right-padded
    score is read at a pad position."""
    if model.config.pad_token_id != pad_id:
        raise PosttrainError(
            f"{stage}: reward model '{path}' reads its score at the last token that is not pad_token_id "
            f"{model.config.pad_token_id} (its config), but its inputs are padded with {pad_id} (the tokenizer's pad "
            "token): the scores of padded sequences would be read at a pad position",
            fix=f"set \"pad_token_id\": {pad_id} in the reward model's config.json")


def score_ids(model, sequences: list[list[int]], pad_id: int, *, batch_size: int = 32,
              padding_side: str = "right") -> list[float]:
    """The reward model's score of each token sequence, read at its last real token."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
            ids[j, sl] = torch.tensor(s)
            mask[j, sl] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out += logits[:, 0].float().tolist()
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m posttrain.rl.rewards MODEL_DIR IDS_JSON`: print the scores as JSON."""
    model_dir, ids_file = (argv or sys.argv[1:])[:2]
    payload = json.loads(Path(ids_file).read_text())
    model = load_reward_model(model_dir, method=payload.get("method"), model_dtype=payload.get("model_dtype"))
    print(json.dumps(score_ids(model, payload["sequences"], payload["pad_id"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
