"""`posttrain push`: a finished stage to the Hugging Face Hub, with huggingface_hub.

What goes up is what a user of the model needs and nothing else: the model or adapter weights and
configs, the tokenizer with its chat template, the generation config, the model card and the
manifest; never checkpoints, optimizer states, pickles (training_args.bin) or logs. The token is
the one huggingface_hub finds itself (HF_TOKEN, or `hf auth login`'s cache); posttrain never reads
or writes it. Every failure of the Hub (offline, no token, no permission) is one line.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from posttrain import card, manifest, models, registry
from posttrain.console import console
from posttrain.errors import PosttrainError

# What a stage directory ships: weights and their configs, tokenizer and template, card, manifest.
PUSHED = ("*.safetensors", "model.safetensors.index.json", "config.json", "adapter_config.json",
          "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "tokenizer.model", "chat_template.jinja", card.CARD, manifest.MANIFEST)


def files_to_push(directory: str | Path) -> list[str]:
    """The files of a finished model stage that `push` uploads (names relative to it), checked:
    a finished stage, a model (not format's data or eval's results), weights and a card present."""
    d = Path(directory)
    m = manifest.read(d)
    if m is None:
        raise PosttrainError(f"'{d}' is not a finished stage (no {manifest.MANIFEST})",
                             fix="finish it first (or --resume it); push uploads finished stages only")
    record = registry.STAGES.get(m.get("stage"))
    if record is None or not record.model:
        raise PosttrainError(f"'{d}' holds the {m.get('stage')} stage, which is not a model",
                             fix="push a model stage (sft, dpo, merge ...)")
    files = sorted(p.name for p in d.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in PUSHED))
    if not any(f.endswith(".safetensors") for f in files):
        raise PosttrainError(f"'{d}' has no safetensors weights", fix="re-run the stage that made it")
    if card.CARD not in files:
        raise PosttrainError(f"'{d}' has no model card ({card.CARD})", fix="re-run the stage (it writes one)")
    return files


def local_base_warning(directory: str | Path) -> str | None:
    """An adapter whose base is a local path: nobody who downloads it can load it as it is."""
    base = models.adapter_base(str(directory))
    hub_id = base is not None and base.count("/") == 1 and not base.startswith((".", "~")) and not Path(base).exists()
    if base is None or hub_id:
        return None
    return (f"the adapter's base is the local path '{base}': users of the Hub repo cannot load it; push the base "
            "first and point the adapter at it, or merge (posttrain merge) and push the merged model")


def push(directory: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Upload a finished stage; returns the commit URL."""
    import httpx2  # huggingface_hub 2.x's HTTP client: its transport errors (no network) are not OSErrors
    from huggingface_hub import HfApi

    files = files_to_push(directory)
    warning = local_base_warning(directory)
    if warning:
        console.print(f"[yellow]warning[/] {warning}")
    stage = manifest.read(directory).get("stage")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), allow_patterns=files,
                                 revision=revision, commit_message=f"posttrain {stage}: {Path(directory).name}")
    except (OSError, ValueError, httpx2.HTTPError) as e:  # HTTP, offline, no token; a malformed id; transport
        raise PosttrainError(f"push to '{repo_id}' failed: {type(e).__name__}: {_first_line(e)}",
                             fix="check the network and your token (HF_TOKEN or `hf auth login`), and the repo id"
                             ) from None
    console.print(f"pushed {len(files)} files of {directory} to {repo_id}" + (f"@{revision}" if revision else ""))
    return str(getattr(info, "commit_url", info))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
