"""Configs: YAML + `--set` overrides → one typed, validated `Config`, without importing torch.

One YAML describes either one stage or the whole chain. Top-level sections:

    model:     the base model (Hub name or local path) and how to load it
    template:  the chat template (built in: chatml, gemma, llama3, mistral, phi3; the tokenizer's
               own; or a .jinja file)
    data:      named datasets (`sft`, `preference`, ...) with their sources and column mappings
    stages:    the chain, in order (used by `posttrain run`)
    output_dir: the output root; each stage writes <output_dir>/<stage> unless --output is given
    sft / dpo / ...: one section per stage; `training:` holds the TRL config fields verbatim

The section models are in sections.py; this module holds the root `Config` with its
cross-section rules, loading (YAML, line map, `--set`), the dataset checks of each stage, the
translation of validation errors, the checks of `training:` and the resolved form.

Unknown keys anywhere are errors that name the key, its line in the file and the nearest valid
key. Trainer hyperparameters under `training:` are checked against a snapshot of TRL's config
dataclasses (trl_fields.json), because importing TRL would import torch.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from posttrain import registry
from posttrain.errors import PosttrainError, did_you_mean
from posttrain.sections import (
    ControlStageConfig,
    DataConfig,
    DPOStageConfig,
    EvalStageConfig,
    ExportStageConfig,
    FormatStageConfig,
    LaunchConfig,
    MergeStageConfig,
    ModelConfig,
    OnlineStageConfig,
    PPOStageConfig,
    PushConfig,
    RewardStageConfig,
    SFTStageConfig,
    Strict,
    TemplateConfig,
)

# The config section of each stage whose `training:` holds a TRL config's fields, and that class.
TRAINING_SECTIONS = {s.section: s.trl_config for s in registry.STAGES.values() if s.trl_config}
# Trainer fields that posttrain sets itself; setting them under `training:` would be ignored.
OWNED_TRAINING_FIELDS = {
    "output_dir": "use --output or the top-level output_dir",
    "assistant_only_loss": "set it as sft.assistant_only_loss",
    "chat_template_path": "set template.name",
    "model_init_kwargs": "set model.dtype / model.attn_implementation",
    "pad_token": "set model.pad_token",
    "resume_from_checkpoint": "pass --resume on the command line",
    "precompute_ref_log_probs": "set dpo.reference: precomputed",
    "reward_weights": "set weight on each entry of rewards:",
    "reward_model_path": "set rewards: [{model: DIR}]",
    # a secret would be written into config.resolved.yaml and every manifest
    "hub_token": "it is a secret: set HF_TOKEN in the environment (posttrain writes no token to any file)",
}


class Config(Strict):
    model: ModelConfig = Field(description="The base model and how it is loaded.")
    template: TemplateConfig = Field(default_factory=TemplateConfig, description="The chat template.")
    data: dict[str, DataConfig] = Field(
        default_factory=dict, description="Named datasets {name: dataset}; stage sections refer to them by name."
    )
    stages: list[Literal[registry.NAMES]] = Field(
        default_factory=lambda: ["format", "sft"],
        description=f"The chain `posttrain run` runs: a subsequence of {', '.join(registry.NAMES)}, in that order, "
        "without repeats.",
    )
    output_dir: str = Field(
        "runs/posttrain", description="Output root: stage <name> writes <output_dir>/<name> unless --output is given."
    )
    seed: int = Field(
        42, description="Seed of every stage (trainers' seed and data_seed, PPO's sampling; eval.seed's default)."
    )
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig, description="How many processes each training stage runs in."
    )
    push: PushConfig = Field(
        default_factory=PushConfig, description="Upload a finished stage to the Hub at the end of `posttrain run`."
    )
    format: FormatStageConfig = Field(
        default_factory=FormatStageConfig, description="`posttrain format`: datasets converted and checked."
    )
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig, description="`posttrain sft`: supervised fine-tuning.")
    reward: RewardStageConfig = Field(
        default_factory=RewardStageConfig, description="`posttrain reward`: a reward model trained on preference pairs."
    )
    ppo: PPOStageConfig = Field(
        default_factory=PPOStageConfig, description="`posttrain ppo`: posttrain's own PPO against a reward model."
    )
    rloo: OnlineStageConfig = Field(
        default_factory=OnlineStageConfig, description="`posttrain rloo`: RLOO through TRL's RLOOTrainer."
    )
    grpo: OnlineStageConfig = Field(
        default_factory=OnlineStageConfig, description="`posttrain grpo`: GRPO through TRL's GRPOTrainer."
    )
    dpo: DPOStageConfig = Field(
        default_factory=DPOStageConfig, description="`posttrain dpo`: preference optimisation with TRL's DPOTrainer."
    )
    merge: MergeStageConfig = Field(
        default_factory=MergeStageConfig, description="`posttrain merge`: a LoRA/QLoRA adapter merged into its base."
    )
    control: ControlStageConfig = Field(
        default_factory=ControlStageConfig, description="`posttrain control`: SFT continued for the compute the "
        "stages after SFT used (the report's control row).")
    eval: EvalStageConfig = Field(
        default_factory=EvalStageConfig, description="`posttrain eval`: every model on the same held-out data."
    )
    export: ExportStageConfig = Field(
        default_factory=ExportStageConfig, description="`posttrain export`: the chain's model as a GGUF file for "
        "llama.cpp and Ollama, with a Modelfile and a round-trip check."
    )
    # The directory of the YAML file: reward functions (`module:function`) are imported from there
    # or from installed packages, nowhere else.
    _source_dir: str | None = PrivateAttr(None)
    # The file and --set overrides it was read from: what a launched process reads again.
    _source: tuple[str | None, tuple[str, ...]] = PrivateAttr((None, ()))
    # The file (or "config") and the line of each key in it (config._where): check_stage's errors
    # after loading name file:line too.
    _origin: str = PrivateAttr("config")
    _lines: dict = PrivateAttr(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, v: list[str]) -> list[str]:
        order = [registry.NAMES.index(s) for s in v]
        if order != sorted(set(order)):
            raise ValueError(f"stages must be a subsequence of {list(registry.NAMES)} without repeats")
        return v

    def uses_reward_stage(self, stage: str) -> bool:
        """Whether an RL stage scores with this config's reward stage (<output_dir>/reward)."""
        if stage == "ppo":
            return self.ppo.reward_model is None
        return any(r.model is None and r.function is None for r in getattr(self, stage).rewards)

    def starts_from(self, stage: str) -> str | None:
        """The policy stage whose output `stage` starts from in this chain: the last policy stage
        (registry) before it in stages (None: model.name_or_path). As `common.default_base` and `chain.plan`."""
        before = [s for s in self.stages[: self.stages.index(stage)] if registry.STAGES[s].policy] \
            if stage in self.stages else []
        return before[-1] if before else None

    def push_stage(self) -> str | None:
        """The stage `posttrain run` uploads when push.repo_id is set: push.stage, else the last
        policy or merge stage of the chain (None: there is none)."""
        return self.push.stage if self.push.stage is not None else self.model_stage_before(None)

    def model_stage_before(self, stage: str | None) -> str | None:
        """The last policy or merge stage before `stage` (None: the whole chain): the model the chain
        has made by then, what export writes and push uploads (None: there is none)."""
        stages = self.stages[: self.stages.index(stage)] if stage in self.stages else self.stages
        shipped = [s for s in stages if registry.STAGES[s].role in ("policy", "merge")]
        return shipped[-1] if shipped else None

    def _check_methods_across_stages(self) -> None:
        """Method combinations of adjacent stages that cannot work, refused before anything trains.

        A stage started from a LoRA/QLoRA output (an adapter) merges that adapter (method full) or
        continues it (lora/qlora; qlora on the 4-bit base): control, reward, ppo, rloo, grpo and dpo
        all do, so every method works after every method, except:
          - dpo.reference adapter_disabled on an adapter: DPO continues the adapter, and disabling it
            would make the model under it (the pre-SFT base) the reference;
          - merge needs an adapter: the stage it merges must be lora/qlora;
          - export needs a full model: after a lora/qlora stage, merge comes first.
        """
        start = self.starts_from("dpo")
        if self.dpo.reference == "adapter_disabled" and start and getattr(self, start).method != "full":
            raise ValueError(
                f"dpo.reference 'adapter_disabled' with dpo after {start} (method {getattr(self, start).method}): "
                f"dpo continues the {start} adapter, and disabling it would make the model under it the reference "
                f"(set dpo.reference: copy, or {start}.method: full)")
        if "merge" in self.stages:
            start = self.starts_from("merge")
            if start is None:
                raise ValueError("stages has merge, but no training stage before it writes an adapter to merge "
                                 "(add sft/ppo/rloo/grpo/dpo with method lora or qlora before merge, or drop merge)")
            if getattr(self, start).method == "full":
                raise ValueError(f"stages has merge after {start}, whose method is full: there is no adapter "
                                 f"to merge (drop merge from stages, or set {start}.method: lora)")
        exported = self.model_stage_before("export") if "export" in self.stages else None
        if exported and registry.STAGES[exported].policy and getattr(self, exported).method != "full":
            raise ValueError(f"stages has export after {exported}, whose output is a LoRA adapter "
                             f"({exported}.method {getattr(self, exported).method}); a GGUF file holds a full model "
                             f"(put merge before export, or set {exported}.method: full)")

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        unknown = [n for n in self.format.datasets or [] if n not in self.data]
        if unknown:
            raise ValueError(f"format.datasets names {unknown}, which are not under data:")
        if self.dpo.reference == "adapter_disabled" and self.dpo.method == "full":
            raise ValueError("dpo.reference 'adapter_disabled' needs dpo.method lora or qlora (a full model has "
                             "no adapter to disable); use reference 'copy'")
        for stage in registry.names(rl=True):
            if stage in self.stages and self.uses_reward_stage(stage) and "reward" not in self.stages:
                raise ValueError(f"{stage} scores with this config's reward stage, but stages has no reward before it "
                                 f"(add reward to stages, or name a reward model or function in {stage})")
        if "control" in self.stages and "sft" not in self.stages:
            raise ValueError("stages has control (SFT continued from the sft stage's output), but no sft stage")
        self._check_methods_across_stages()
        if self.push.repo_id is not None:
            stage = self.push_stage()
            if stage is None or stage not in self.stages or not registry.STAGES[stage].model:
                raise ValueError(f"push.repo_id is set, but push.stage '{stage}' is not a model stage of stages: "
                                 "(set push.stage to one, or put a training or merge stage in stages)")
        return self


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Read YAML (or start from `base`), apply `key.path=value` overrides, validate."""
    where = str(path) if path else "config"
    raw: dict = dict(base or {})
    lines: dict[tuple, int] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise PosttrainError(f"config file '{p}' does not exist", fix="check the path")
        text = _read_text(p)
        try:
            node = yaml.compose(text, Loader=_Loader)
            loaded = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"{p}:{mark.line + 1}" if mark else str(p)
            raise PosttrainError(f"not valid YAML ({getattr(e, 'problem', e)})", where=at) from None
        except UNCONSTRUCTABLE as e:
            raise PosttrainError(f"a value PyYAML cannot read ({type(e).__name__}: {_short(e)})", where=str(p),
                                 fix="quote the value to make it a string, or fix it") from None
        if loaded is None:
            raise PosttrainError("config file is empty", where=str(p), fix="see configs/ for examples")
        if not isinstance(loaded, dict):
            raise PosttrainError("config must be a mapping of sections (model:, data:, sft: ...)", where=str(p))
        raw = loaded
        _line_map(node, (), lines)
    for item in overrides or []:
        _apply_override(raw, item, lines)
    cfg = validate_dict(raw, where=where, lines=lines)
    if path is not None:
        cfg._source_dir = str(Path(path).resolve().parent)
    cfg._source = (str(path) if path is not None else None, tuple(overrides or ()))
    return cfg


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 wants 1.0e-3 and gives the string '1e-3')."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# What PyYAML's constructors raise for a scalar it resolved (or was told by a tag) to a type that
# cannot hold it: 2020-02-30 as a date, `!!int x`, an int of more than 4300 digits, `!!timestamp x`
# (AttributeError: its regex does not match and PyYAML reads the match anyway); and Python's
# recursion limit for input nested thousands deep.
UNCONSTRUCTABLE = (ValueError, TypeError, IndexError, KeyError, OverflowError, AttributeError, RecursionError)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:120]


def _parse_value(text: str):
    return yaml.load(text, Loader=_Loader) if text.strip() else None  # noqa: S506


def validate_dict(raw: dict, where: str = "config", lines: dict[tuple, int] | None = None) -> Config:
    lines = lines or {}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise _to_error(e, where, lines) from None
    except RecursionError:
        raise PosttrainError("the config is nested too deeply (or refers to itself through a YAML anchor)",
                             where=where, fix="flatten it; no posttrain setting nests more than a few levels") from None
    cfg._origin, cfg._lines = where, lines
    _check_datasets(cfg)
    for stage, cls_name in TRAINING_SECTIONS.items():
        _check_training(getattr(cfg, stage).training, cls_name, (stage, "training"), where, lines)
    _check_cross_training(cfg, where)
    return cfg


# ---------------------------------------------------------------------------------------------
# The datasets each stage reads: checked for the chain's stages when the config loads, and by
# each stage when it starts (check_stage: a stage command may run one that is not in stages:).


def check_stage(cfg: Config, stage: str) -> None:
    """Everything `stage` needs from the config that loading did not check: its datasets, under
    data: and of the kind it reads. Called first thing by the stages."""
    record = registry.STAGES[stage]
    if record.data is not None:
        _check_dataset(cfg, f"{record.section}.data", record.data, stage)
    if stage == "ppo" and cfg.ppo.ptx_coef > 0:
        _check_dataset(cfg, "ppo.ptx_data", "sft", "ppo (ptx_coef > 0)")
    if stage == "eval":
        _check_dataset(cfg, "eval.data", "sft", "eval")
        if cfg.eval.pairs is not None:
            _check_dataset(cfg, "eval.pairs", "preference", "eval")


def _check_datasets(cfg: Config) -> None:
    """The stages in `stages:`, and any section naming an existing dataset of the wrong kind."""
    for record in registry.STAGES.values():
        if record.data is None or record.section != record.name:  # control reads sft's data: checked as sft's
            continue
        if record.name in cfg.stages or getattr(cfg, record.name).data in cfg.data:
            _check_dataset(cfg, f"{record.name}.data", record.data, record.name)
    if cfg.ppo.ptx_coef > 0:
        _check_dataset(cfg, "ppo.ptx_data", "sft", "ppo (ptx_coef > 0)")
    if "eval" in cfg.stages:
        _check_dataset(cfg, "eval.data", "sft", "eval")
    if cfg.eval.pairs is not None:
        _check_dataset(cfg, "eval.pairs", "preference", "eval")


def _check_dataset(cfg: Config, key: str, kind: str, needs: str) -> None:
    section, field = key.split(".")
    name = getattr(getattr(cfg, section), field)
    at = _where(cfg._origin, cfg._lines, (section, field))
    if name not in cfg.data:
        near = did_you_mean(name, cfg.data)
        what = "sft or preference: its prompts are sampled" if kind == "any" else f"of kind {kind}"
        raise PosttrainError(f"{key} names dataset '{name}', which is not under data:", where=at,
                             fix=f"did you mean '{near}'?" if near else f"add a data.{name} section ({what})")
    if kind != "any" and cfg.data[name].kind != kind:
        raise PosttrainError(f"{key} '{name}' has kind '{cfg.data[name].kind}', but {needs} needs kind '{kind}'",
                             where=at)


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PosttrainError(f"not UTF-8 text (byte {e.start})", where=str(p), fix="save the file as UTF-8") from None


def _apply_override(raw: dict, item: str, lines: dict) -> None:
    if "=" not in item:
        raise PosttrainError(f"--set '{item}' is not key.path=value", fix="e.g. --set sft.training.max_steps=10")
    key, value = item.split("=", 1)
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise PosttrainError(f"--set '{item}' has an empty key")
    try:
        parsed = _parse_value(value)
    except (yaml.YAMLError, *UNCONSTRUCTABLE):
        parsed = value  # as the string it is; validation says what the key wants
    for known in [k for k in lines if k[: len(parts)] == tuple(parts)]:
        del lines[known]
    lines[tuple(parts)] = f"--set {item}"
    node = raw
    for k in parts[:-1]:
        if isinstance(node, list):
            node = _list_item(node, k, item)
        else:
            if not isinstance(node.get(k), (dict, list)):
                node[k] = {}
            node = node[k]
    if isinstance(node, list):
        node[_index(node, parts[-1], item)] = parsed
    else:
        node[parts[-1]] = parsed


def _index(items: list, k: str, item: str) -> int:
    if not k.isdigit() or int(k) >= len(items):
        raise PosttrainError(f"--set '{item}': '{k}' is not an index of a list of {len(items)}")
    return int(k)


def _list_item(items: list, k: str, item: str):
    found = items[_index(items, k, item)]
    if not isinstance(found, dict):
        raise PosttrainError(f"--set '{item}': item {k} is not a mapping")
    return found


def _line_map(node, path: tuple, out: dict) -> None:
    """Remember the line of every mapping key and list item so errors can point into the file.
    A loop, not recursion (any depth), and each node once (an anchor may refer to itself)."""
    todo, seen = [(node, path)], set()
    while todo:
        node, path = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, k.value)
                out[key] = k.start_mark.line + 1
                todo.append((v, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[(*path, i)] = v.start_mark.line + 1
                todo.append((v, (*path, i)))


def _where(where: str, lines: dict, loc: tuple) -> str:
    for n in range(len(loc), 0, -1):
        found = lines.get(loc[:n])
        if isinstance(found, str):
            return found
        if found is not None:
            return f"{where}:{found}"
    return where


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the config section at `loc` (for did-you-mean).

    List indices and the keys of free-form mappings (dataset names under data:) are not fields.
    """
    import typing

    model: Any = Config
    skip_next = False
    for part in loc:
        if isinstance(part, int) or skip_next:
            skip_next = False
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        skip_next = typing.get_origin(field.annotation) is dict
        model = _model_of(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_of(annotation) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _to_error(e: ValidationError, where: str, lines: dict) -> PosttrainError:
    errors = e.errors()
    err = errors[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    at = _where(where, lines, loc)
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(loc[:-1])
        near = did_you_mean(key, valid)
        fix = f"did you mean '{near}'?" if near else f"valid keys here: {', '.join(valid)}"
        return PosttrainError(f"unknown key '{_dotted(loc)}'{more}", where=at, fix=fix)
    if err["type"] == "value_error":
        return PosttrainError(f"{err['ctx']['error']}{more}", where=at)
    if err["type"] == "missing":
        return PosttrainError(f"missing required key '{_dotted(loc)}'{more}", where=at)
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    msg = err["msg"][0].lower() + err["msg"][1:]
    return PosttrainError(f"'{_dotted(loc)}' is {shown}: {msg}{more}", where=at)


# ---------------------------------------------------------------------------------------------
# Trainer fields (validated against the TRL snapshot)


@cache
def trl_fields() -> dict:
    text = resources.files("posttrain").joinpath("trl_fields.json").read_text()
    return json.loads(text)


_KIND_OF = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict", type(None): "null"}


def _check_training(training: dict, cls_name: str, loc: tuple, where: str, lines: dict) -> None:
    fields = trl_fields()["configs"][cls_name]
    for key, value in training.items():
        kloc = (*loc, key)
        at = _where(where, lines, kloc)
        if key in OWNED_TRAINING_FIELDS:
            raise PosttrainError(
                f"'{_dotted(kloc)}' is set by posttrain", where=at, fix=OWNED_TRAINING_FIELDS[key]
            )
        if key not in fields:
            near = did_you_mean(key, fields)
            fix = f"did you mean '{near}'?" if near else f"see the fields of trl.{cls_name}"
            raise PosttrainError(f"unknown key '{_dotted(kloc)}' (not a field of trl.{cls_name})", where=at, fix=fix)
        spec = fields[key]
        kind = _KIND_OF.get(type(value), "any")
        ok = "any" in spec["kinds"] or kind in spec["kinds"] or (kind == "int" and "float" in spec["kinds"])
        if not ok:
            want = " or ".join(k for k in spec["kinds"] if k != "null") or "null"
            raise PosttrainError(f"'{_dotted(kloc)}' is {value!r} ({kind}), expected {want}", where=at)
        if "choices" in spec and isinstance(value, str) and value not in spec["choices"]:
            near = did_you_mean(value, spec["choices"])
            fix = f"did you mean '{near}'?" if near else f"one of: {', '.join(spec['choices'])}"
            raise PosttrainError(f"'{_dotted(kloc)}' is '{value}', not a valid choice", where=at, fix=fix)
        if kind in ("int", "float") and value < 0 and key in _NON_NEGATIVE:
            raise PosttrainError(f"'{_dotted(kloc)}' is {value}, must be >= 0", where=at)


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

_NON_NEGATIVE = {
    "learning_rate", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "warmup_steps", "weight_decay", "max_length", "logging_steps",
    "save_steps", "eval_steps", "max_grad_norm", "beta",
}


def _check_cross_training(cfg: Config, where: str) -> None:
    t = cfg.sft.training
    if t.get("packing") and t.get("packing_strategy") == "wrapped":
        raise PosttrainError(
            "sft.training.packing_strategy 'wrapped' cuts samples mid-sequence and lets them attend to each other",
            where=where,
            fix="use packing_strategy 'bfd' (position-id segmentation)",
        )
    loss_type = cfg.dpo.training.get("loss_type", ["sigmoid"])
    loss_type = [loss_type] if isinstance(loss_type, str) else loss_type
    bad = [t for t in loss_type if t not in DPO_LOSS_TYPES]
    if bad:
        near = did_you_mean(str(bad[0]), DPO_LOSS_TYPES)
        raise PosttrainError(f"dpo.training.loss_type has unknown type {bad[0]!r}", where=where,
                             fix=f"did you mean '{near}'?" if near else f"one of: {', '.join(DPO_LOSS_TYPES)}")
    weights = cfg.dpo.training.get("loss_weights")
    if weights is not None and len(weights) != len(loss_type):
        raise PosttrainError(f"dpo.training.loss_weights has {len(weights)} weights for {len(loss_type)} loss types",
                             where=where, fix="give one weight per entry of loss_type")
    for stage in TRAINING_SECTIONS:
        tr = getattr(cfg, stage).training
        if tr.get("bf16") and tr.get("fp16"):
            raise PosttrainError(f"{stage}.training sets both bf16 and fp16", where=where, fix="choose one")


# ---------------------------------------------------------------------------------------------
# Resolved form


def to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def stage_output(cfg: Config, stage: str, output: str | None) -> Path:
    return Path(output) if output else Path(cfg.output_dir) / stage


def device_training_defaults(has_cuda: bool, bf16_supported: bool) -> dict:
    """Trainer settings that depend on the device, so users never meet TRL's CPU quirks.

    TRL's configs default to bf16=True, which fails or crawls on CPUs; on CPU we turn it off and
    set use_cpu. On CUDA, bf16 where the GPU has it.
    """
    if not has_cuda:
        return {"use_cpu": True, "bf16": False, "fp16": False, "dataloader_pin_memory": False}
    return {"bf16": bf16_supported, "fp16": False}
