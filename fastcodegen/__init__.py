"""fastcodegen: a fast inference engine for the Salesforce CodeGen models.

from fastcodegen import Engine, SamplingParams
engine = Engine("codegen-350M-mono")
outs = engine.generate(["def fib(n):"], SamplingParams(max_tokens=128, temperature=0.2, top_p=0.95))
print(outs[0].outputs[0].text)
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module defining it, imported on first use, so that `import fastcodegen` (the
# command line's start, where a Ctrl-C must be handled) does not wait for torch.
_EXPORTS = {
    "CODEGEN_STOP_PATTERNS": "sampling_params",
    "CompletionOutput": "outputs",
    "Engine": "engine",
    "GenerationError": "outputs",
    "ModelNotFoundError": "hub",
    "RequestOutput": "outputs",
    "SamplingParams": "sampling_params",
}

__all__ = [
    "CODEGEN_STOP_PATTERNS",
    "CompletionOutput",
    "Engine",
    "GenerationError",
    "ModelNotFoundError",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .engine import Engine
    from .hub import ModelNotFoundError
    from .outputs import CompletionOutput, GenerationError, RequestOutput
    from .sampling_params import CODEGEN_STOP_PATTERNS, SamplingParams
