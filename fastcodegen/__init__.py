"""fastcodegen: a fast inference engine for the Salesforce CodeGen models.

from fastcodegen import Engine, SamplingParams
engine = Engine("codegen-350M-mono")
outs = engine.generate(["def fib(n):"], SamplingParams(max_tokens=128, temperature=0.2, top_p=0.95))
print(outs[0].outputs[0].text)
"""

from .engine import Engine
from .hub import ModelNotFoundError
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import CODEGEN_STOP_PATTERNS, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "CODEGEN_STOP_PATTERNS",
    "CompletionOutput",
    "Engine",
    "ModelNotFoundError",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]
