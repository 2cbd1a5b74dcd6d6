"""The official CodeGen checkpoints, known by name without a network.

Also `codegen-tiny-py`, a small CodeGen trained on the Python standard library
and shipped with the package (`tools/train_tiny.py` made it): a demo and a
test fixture that runs anywhere, offline; and `codegen-tiny-py-draft`, a
smaller one with its tokenizer, its draft model for speculative decoding.

Twelve checkpoints, `Salesforce/codegen-{350M,2B,6B,16B}-{nl,multi,mono}`, in
four sizes; the three variants of a size share one architecture. A name here
resolves offline, and `load_format="dummy"` builds its real shapes from this
table alone. A real load reads the checkpoint's own `config.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import ModelConfig

HF_ORG = "Salesforce"

_SIZES: dict[str, ModelConfig] = {
    "350M": ModelConfig(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32),
    "2B": ModelConfig(n_layer=32, n_embd=2560, n_head=32, rotary_dim=64),
    "6B": ModelConfig(n_layer=33, n_embd=4096, n_head=16, rotary_dim=64),
    "16B": ModelConfig(n_layer=34, n_embd=6144, n_head=24, rotary_dim=64),
}
_VARIANTS = ("nl", "multi", "mono")

MODELS: dict[str, ModelConfig] = {
    f"codegen-{size}-{variant}": config for size, config in _SIZES.items() for variant in _VARIANTS
}


# Checkpoints shipped inside the package: found by name, offline, on any machine.
BUNDLED_DIR = Path(__file__).parent / "data"
BUNDLED = ("codegen-tiny-py", "codegen-tiny-py-draft")
DEFAULT_MODEL = "codegen-tiny-py"


def bundled_path(model: str) -> Optional[Path]:
    """The directory of a bundled checkpoint named `model`, or None."""
    return BUNDLED_DIR / model if model in BUNDLED and (BUNDLED_DIR / model / "config.json").is_file() else None


def official_name(model: str) -> Optional[str]:
    """'codegen-2B-mono' or 'Salesforce/codegen-2B-mono' -> 'codegen-2B-mono'; None if not official."""
    name = model.removeprefix(f"{HF_ORG}/")
    return name if name in MODELS else None


# CodeGen's own tokenizer (GPT-2's byte-level BPE plus 38 whitespace runs), shared by
# all twelve official checkpoints; `tools/build_codegen_tokenizer.py` wrote it.
CODEGEN_TOKENIZER_DIR = BUNDLED_DIR / "codegen-tokenizer"


def codegen_tokenizer_dir() -> Path:
    """The directory of CodeGen's tokenizer shipped with the package (`tokenizer.json`)."""
    return CODEGEN_TOKENIZER_DIR


def bundled_tokenizer(model: str) -> Optional[Path]:
    """The shipped tokenizer directory for an official name (with or without 'Salesforce/'), else None.

    The official checkpoints all use one tokenizer, so a name alone gives text in and out offline:
    with `load_format="dummy"`, or when a checkpoint directory lacks its tokenizer files.
    """
    if official_name(model) is None or not (CODEGEN_TOKENIZER_DIR / "tokenizer.json").is_file():
        return None
    return CODEGEN_TOKENIZER_DIR


def repo_id(name: str) -> str:
    return f"{HF_ORG}/{name}"
