"""From a model name to what an engine runs: its config, tokenizer and weights.

A name is an official CodeGen name, a Hugging Face repo id, or a checkpoint
directory (a transformers one, or one written by `fastcodegen convert`);
`hub.locate` finds it, and a transformers checkpoint is converted once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from . import hub, registry
from .config import EngineConfig, ModelConfig, read_checkpoint_config
from .integrity import verify_converted
from .tokenizer import Tokenizer
from .weights import CodeGenWeights, dummy_weights, is_converted, load_weights, read_converted_config

logger = logging.getLogger("fastcodegen")


def load_config(
    model: str,
    load_format: str,
    revision: Optional[str],
    download: bool,
    cache_dir: Optional[str],
    dtype: torch.dtype,
    progress: bool,
) -> tuple[ModelConfig, Optional[Path]]:
    """The model config and the converted checkpoint directory (None for dummy weights)."""
    # Imported here, not at the top: `python -m fastcodegen.convert` must find
    # the module unimported when the package initialises.
    from .convert import ensure_converted

    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    if load_format == "dummy":
        name = registry.official_name(model)
        if name is not None:
            return registry.MODELS[name], None
        path = registry.bundled_path(model) or Path(model).expanduser()
        if is_converted(path):
            return read_converted_config(path)[0], None
        if (path / "config.json").is_file():
            return read_checkpoint_config(path)[1], None
        raise ValueError(
            f"load_format='dummy' needs an official model name or a checkpoint directory with a config, got {model!r}"
        )
    path = hub.locate(model, revision=revision, download=download)
    if not is_converted(path):
        path = ensure_converted(path, dtype, Path(cache_dir) if cache_dir else None, progress=progress)
    return read_converted_config(path)[0], path


def load_tokenizer(tokenizer: Optional[str], source: Optional[Path], model: str) -> Optional[Tokenizer]:
    """The tokenizer of `tokenizer` (a directory) if given, else the checkpoint's, else CodeGen's for an official name."""
    if tokenizer is not None:
        return Tokenizer.from_dir(tokenizer)
    candidates = [source] if source is not None else []
    local = Path(model).expanduser()
    if local.is_dir():
        candidates.append(local)
    shipped = registry.bundled_tokenizer(model)  # an official name: CodeGen's tokenizer, shipped
    if shipped is not None:
        candidates.append(shipped)
    for path in candidates:
        try:
            return Tokenizer.from_dir(path)
        except FileNotFoundError:
            continue
    logger.warning("no tokenizer found for %s: prompts must be token ids and outputs have no text", model)
    return None


def load_model_weights(
    source: Optional[Path], config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int, progress: bool
) -> CodeGenWeights:
    """The converted checkpoint's weights, checked first (a damaged file: a ValueError naming it); dummy ones without a source."""
    if source is None:
        return dummy_weights(config, device, dtype, seed=seed)
    verify_converted(source, progress=progress)
    return load_weights(source, config, device, dtype, progress=progress)


def load_draft(
    engine: EngineConfig, target: ModelConfig, tokenizer: Optional[Tokenizer], vocab_limit: int, progress: bool
) -> tuple[ModelConfig, CodeGenWeights]:
    """The draft model of `engine.speculative_model`: its config and weights, on the target's device and dtype.

    Raises ValueError unless it shares the target's vocabulary (the same
    tokenizer: every token's bytes and the special tokens, or, without
    tokenizers, the same vocabulary size) and covers the engine's context.
    """
    name = engine.draft_model
    m, source = load_config(
        name, engine.load_format, None, engine.download, engine.cache_dir, engine.dtype, progress
    )
    draft_tokenizer = load_tokenizer(None, source, name)
    if tokenizer is not None:
        if draft_tokenizer is None:
            raise ValueError(f"speculative_model {name!r} has no tokenizer: a draft must share the target's")
        same = (
            draft_tokenizer.vocab_limit == tokenizer.vocab_limit
            and draft_tokenizer.special_ids == tokenizer.special_ids
            and all(draft_tokenizer.token_bytes(i) == tokenizer.token_bytes(i) for i in range(tokenizer.vocab_limit))
        )
        if not same:
            raise ValueError(
                f"speculative_model {name!r} does not share the target's tokenizer: its {draft_tokenizer.vocab_limit} "
                f"token ids are not the target's {tokenizer.vocab_limit} (a draft must propose the target's tokens)"
            )
    elif m.vocab_size != target.vocab_size:
        raise ValueError(
            f"speculative_model {name!r} has a vocabulary of {m.vocab_size} ids, the target {target.vocab_size}"
        )
    if m.vocab_size < vocab_limit:
        raise ValueError(f"speculative_model {name!r} has {m.vocab_size} output ids, fewer than the {vocab_limit} tokens")
    if m.n_positions < engine.max_model_len:
        raise ValueError(
            f"speculative_model {name!r} covers {m.n_positions} positions, less than max_model_len={engine.max_model_len}"
        )
    return m, load_model_weights(source, m, engine.device, engine.dtype, engine.seed, progress)
