"""Write src/posttrain/trl_fields.json: the fields of TRL's trainer configs, without torch.

`posttrain validate` must check trainer hyperparameters against TRL's config classes without
importing torch (importing `trl.SFTConfig` pulls in transformers and torch). This script snapshots
each field's name, the JSON types it accepts and its choices. tests/test_trl_fields.py regenerates
the snapshot from the installed TRL and fails if it differs, so it cannot drift from the pin.

    python scripts/dump_trl_fields.py            # rewrite the snapshot
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

CONFIGS = ["SFTConfig", "DPOConfig", "RewardConfig", "RLOOConfig", "GRPOConfig"]
OUT = Path(__file__).resolve().parents[1] / "src" / "posttrain" / "trl_fields.json"


def _kinds(tp) -> set[str]:
    """Map a dataclass field annotation to the YAML value kinds it accepts."""
    if tp is typing.Any:
        return {"any"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(tp)))
    if origin is typing.Literal:
        return {type(a).__name__ for a in typing.get_args(tp)}
    if origin in (list, tuple, typing.List, typing.Tuple):  # noqa: UP006
        return {"list"}
    if origin in (dict, typing.Dict):  # noqa: UP006
        return {"dict"}
    if tp is type(None):
        return {"null"}
    if isinstance(tp, type):
        if issubclass(tp, bool):
            return {"bool"}
        if issubclass(tp, int):
            return {"int"}
        if issubclass(tp, float):
            return {"float"}
        if issubclass(tp, str):  # includes str-valued enums such as IntervalStrategy
            return {"str"}
        if issubclass(tp, (list, tuple)):
            return {"list"}
        if issubclass(tp, dict):
            return {"dict"}
        import enum

        if issubclass(tp, enum.Enum):
            return {"str"}
    return {"any"}


def _enum_choices(tp) -> list[str] | None:
    """Values of a str-valued Enum in the annotation (e.g. SchedulerType), as the valid choices."""
    import enum

    args = typing.get_args(tp) or (tp,)
    for a in args:
        if isinstance(a, type) and issubclass(a, enum.Enum):
            return [m.value for m in a]
    return None


def snapshot() -> dict:
    import trl

    out: dict = {"trl_version": trl.__version__, "configs": {}}
    for name in CONFIGS:
        cls = getattr(trl, name)
        hints = typing.get_type_hints(cls)
        fields = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            entry = {"kinds": sorted(_kinds(hints.get(f.name, typing.Any)))}
            choices = f.metadata.get("choices") if f.metadata else None
            choices = choices or _enum_choices(hints.get(f.name))
            if choices:
                entry["choices"] = list(choices)
            fields[f.name] = entry
        out["configs"][name] = dict(sorted(fields.items()))
    return out


def main() -> int:
    OUT.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
