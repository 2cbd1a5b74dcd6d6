"""Finding a checkpoint: a local directory, the Hugging Face cache, or a download.

`locate(model)` turns what a user passed to `Engine` into a directory on disk:

* a path to a directory (a transformers checkpoint or a converted one);
* the name of a checkpoint shipped with the package (`codegen-tiny-py`);
* an official name (`codegen-2B-mono`, with or without `Salesforce/`) or any
  Hugging Face repo id (`org/name`): looked up in the local Hugging Face cache
  (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), then
  downloaded with `huggingface_hub` when downloading is allowed
  (`download=True` and `HF_HUB_OFFLINE` unset).

Anything else fails with `ModelNotFoundError`, whose message names the model,
where it looked and how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from . import registry
from .tokenizer import TOKENIZER_FILES


class ModelNotFoundError(FileNotFoundError):
    """The model named could not be found locally nor downloaded."""


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def downloads_allowed(download: bool) -> bool:
    return download and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def has_weights(path: Path) -> bool:
    return any(
        (path / f).is_file()
        for f in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )


def repo_id_for(model: str) -> Optional[str]:
    """The Hugging Face repo id a model string names, or None if it names none."""
    name = registry.official_name(model)
    if name is not None:
        return registry.repo_id(name)
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "~")):
        return model
    return None


def locate(model: str, revision: Optional[str] = None, download: bool = True) -> Path:
    """The directory holding `model`'s checkpoint; downloads it if allowed and needed."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    bundled = registry.bundled_path(model)
    if bundled is not None:
        return bundled
    if model.startswith(("/", "./", "../", "~")) or local.exists():
        raise ModelNotFoundError(f"model {model!r}: no such directory")
    if repo_id_for(model) is None:
        known = ", ".join([*registry.BUNDLED, *registry.MODELS])
        raise ModelNotFoundError(
            f"model {model!r} is neither a directory, nor an official CodeGen name ({known}), "
            "nor a Hugging Face repo id of the form 'org/name'"
        )
    repo = repo_id_for(model)
    cache = hf_cache_dir()
    cached = _cached_snapshot(repo, revision, cache)
    if cached is not None and has_weights(cached) and (cached / "config.json").is_file():
        return cached

    if cached is not None:
        where = f"found an incomplete snapshot at {cached} (no config.json or weights)"
    else:
        where = f"looked in the Hugging Face cache at {cache}"
    how = (
        f"To get it, run `hf download {repo}` (or `huggingface-cli download {repo}`) where the Hub is reachable, "
        "point HF_HUB_CACHE or HF_HOME at a cache that holds it, or pass the path of a checkpoint directory"
        + (f"; load_format='dummy' runs {model}'s shapes with random weights" if registry.official_name(model) else "")
        + "."
    )
    if not downloads_allowed(download):
        reason = "HF_HUB_OFFLINE is set" if download else "download=False"
        raise ModelNotFoundError(f"model {model!r} ({repo}) is not available offline: {where}, and {reason}. {how}")
    try:
        return _download(repo, revision, cache)
    except Exception as e:  # huggingface_hub raises many kinds; all mean "not here"
        raise ModelNotFoundError(
            f"model {model!r} ({repo}) could not be found: {where}, and downloading it failed "
            f"({type(e).__name__}: {e}). {how}"
        ) from e


def _cached_snapshot(repo: str, revision: Optional[str], cache: Path) -> Optional[Path]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def _download(repo: str, revision: Optional[str], cache: Path) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    files = set(HfApi().list_repo_files(repo, revision=revision))
    if {"model.safetensors", "model.safetensors.index.json"} & files or any(f.endswith(".safetensors") for f in files):
        weights = ["*.safetensors", "model.safetensors.index.json"]
    else:
        weights = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    path = snapshot_download(
        repo, revision=revision, cache_dir=cache, allow_patterns=["config.json", *TOKENIZER_FILES, *weights]
    )
    return Path(path)
