"""Every kernel launch the engine makes, enumerated without a GPU.

Runs engine steps through the "triton" backend's operations (`Ops` over
the Triton kernels' table: in_proj, attention, out_proj, exactly as the
model calls them) on meta tensors (shapes, no data) at the real shapes of codegen-350M, 2B, 6B and 16B
and at the tests' tiny shapes, and records the kernel launches instead of
running them: the kernel, its grid, its arguments, and the specialisation
Triton's JIT would compile for them (`signature`, `specialization_key`).

Two tools build on it: `benchmarks/kernel_report.py` compiles each launch
ahead of time for sm_90 and predicts what it costs on an H200, and
`tools/warm_triton_cache.py` drives the same steps through Triton's JIT to
fill a kernel cache for a GPU machine.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from fastcodegen.config import ModelConfig
from fastcodegen.kernels.settings import DEFAULT_NUM_SMS
from fastcodegen.kv_cache import KVCache
from fastcodegen.models.ops import Ops, triton_kernels
from fastcodegen.registry import MODELS
from fastcodegen.step import SHAPE_FIELDS, StepInputs
from fastcodegen.weights import CodeGenWeights, tensor_shapes

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}

REAL_MODELS = ("codegen-350M-mono", "codegen-2B-mono", "codegen-6B-mono", "codegen-16B-mono")
# The geometries of tests/conftest.py SHAPES (name: n_embd, n_head, rotary_dim; n_positions 128): the
# engine tests run them on a GPU too. tests/test_warm_triton_cache.py keeps the two lists equal.
TEST_SHAPES = {"hd64": (256, 4, 32), "hd80": (320, 4, 64), "hd256": (1024, 4, 64), "full-rotary": (128, 4, 32)}
TEST_N_POSITIONS = 128
# (module, attribute) of every kernel the engine launches.
KERNELS = (
    ("layer_norm", "_layer_norm_kernel"),
    ("in_proj", "_in_proj_kernel"),
    ("prefill_attention", "_prefill_kernel"),
    ("decode_attention", "_split_kernel"),
    ("decode_attention", "_combine_kernel"),
    ("verify_attention", "_verify_split_kernel"),
    ("out_proj", "_out_proj_kernel"),
)


@dataclass(frozen=True)
class EngineShape:
    """One engine configuration, reduced to what reaches the kernels' launches.

    The model's geometry and dtype; the block-table width (max_model_len over
    block_size), a stride the kernels specialise on; the most rows of a
    decode step (max_num_seqs) and tokens of a step (max_num_batched_tokens);
    the SM count the split-K plans are made for (`DEFAULT_NUM_SMS`: H100 SXM
    and H200).
    """

    label: str
    config: ModelConfig
    dtype: torch.dtype
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_sms: int = DEFAULT_NUM_SMS

    @property
    def table_width(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def describe(self) -> str:
        return f"{self.label} {str(self.dtype).removeprefix('torch.')} tables={self.table_width}"


def engine_shapes(
    models: Iterable[str] = REAL_MODELS,
    dtypes: Iterable[torch.dtype] = (torch.float16, torch.bfloat16),
    test_shapes: bool = True,
    num_sms: int = DEFAULT_NUM_SMS,
) -> list[EngineShape]:
    """The real models at the engine's defaults (max_model_len = n_positions), then the tests' tiny models."""
    shapes = []
    for dtype in dtypes:
        for name in models:
            c = dataclasses.replace(MODELS[name], n_layer=1)
            shapes.append(EngineShape(name, c, dtype, c.n_positions, num_sms=num_sms))
        if test_shapes:
            for name, (d, h, r) in TEST_SHAPES.items():
                c = ModelConfig(n_layer=1, n_embd=d, n_head=h, rotary_dim=r, n_positions=TEST_N_POSITIONS)
                shapes.append(EngineShape(f"test-{name}", c, dtype, c.n_positions, num_sms=num_sms))
    return shapes


@dataclass(frozen=True)
class Step:
    """One engine step as the kernels see it: decode (one new token per row), verify (`tokens` / `rows` new tokens
    per row: speculative decoding) or prefill (`tokens` new tokens)."""

    kind: str
    rows: int
    tokens: int

    def __str__(self) -> str:
        if self.kind == "verify":
            return f"verify rows={self.rows} tokens={self.tokens}"
        return f"decode rows={self.rows}" if self.kind == "decode" else f"prefill tokens={self.tokens}"


def engine_steps(
    shape: EngineShape,
    decode_rows: Optional[Iterable[int]] = None,
    prefill_tokens: Optional[Iterable[int]] = None,
    verify_rows: Optional[Iterable[int]] = None,
) -> list[Step]:
    """The steps whose launches cover every specialisation the engine can make, or the given subsets
    (`verify_rows` left out: every count when `decode_rows` is too, else none).

    Decode: every row count up to max_num_seqs. That holds the CUDA-graph
    buckets of this and of any smaller max_num_seqs, and the eager decode
    steps (enforce_eager), which may have any count. Verify (speculative
    decoding: a few new tokens per row, k + 1 = 5 by default): every row
    count up to max_num_seqs, as for decode; the tokens per row reach no
    kernel's specialisation (split counts follow the rows). Prefill (every
    step the scheduler does not mark decode: prompts, chunks, idle rows):
    every token count up to max_num_batched_tokens, packed into as few
    prompts as max_model_len allows (up to 16 tokens a row, they take the
    verify attention too). Rows and tokens reach the kernels as runtime
    integers (specialised on ==1 and on divisibility by 16), block sizes and
    split counts, so every count is enumerated rather than guessing which
    ones differ.
    """
    rows = range(1, shape.max_num_seqs + 1) if decode_rows is None else decode_rows
    tokens = range(1, shape.max_num_batched_tokens + 1) if prefill_tokens is None else prefill_tokens
    if verify_rows is None:
        verify_rows = rows if decode_rows is None else ()
    steps = [Step("decode", r, r) for r in rows]
    steps += [Step("verify", r, r * VERIFY_TOKENS_PER_ROW) for r in verify_rows]
    steps += [Step("prefill", -(-t // shape.max_model_len), t) for t in tokens]
    return steps


# A verify step's tokens per row: the default num_speculative_tokens (4) + 1.
VERIFY_TOKENS_PER_ROW = 5

# Block tables whose width is not a multiple of 16 (max_model_len 200: 13 blocks), as the kernel tests and
# microbenchmarks make them for short contexts; the engine's own tables are n_positions / 16 wide.
ODD_TABLE_MAX_MODEL_LEN = 200
ODD_TABLE_DECODE_ROWS = (1, 8, 32)
ODD_TABLE_PREFILL_TOKENS = (512,)


def warm_plan(
    models: Iterable[str] = REAL_MODELS,
    dtypes: Iterable[torch.dtype] = (torch.float16, torch.bfloat16),
    test_shapes: bool = True,
    num_sms: int = DEFAULT_NUM_SMS,
) -> list[tuple[EngineShape, list[Step]]]:
    """Every (shape, steps) whose launches a GPU run of the engine, its tests and benchmarks may make.

    The engine at each shape, every step (`engine_steps`); then the real
    models' attention at block tables of a width not divisible by 16 (the
    kernel tests' and microbenchmarks' short contexts) at their batch sizes.
    """
    dtypes = list(dtypes)
    plan = [(s, engine_steps(s)) for s in engine_shapes(models, dtypes, test_shapes, num_sms)]
    for s in engine_shapes(models, dtypes, test_shapes=False, num_sms=num_sms):
        odd = dataclasses.replace(s, max_model_len=ODD_TABLE_MAX_MODEL_LEN)
        plan.append((odd, engine_steps(odd, ODD_TABLE_DECODE_ROWS, ODD_TABLE_PREFILL_TOKENS)))
    return plan


@dataclass
class ShapeState:
    """What a shape's steps share: the ops backend, one layer's weights, one layer's K/V cache."""

    ops: Ops
    weights: CodeGenWeights
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def prepare(shape: EngineShape, device: torch.device = torch.device("meta")) -> ShapeState:
    """The "triton" backend's operations over one layer of meta tensors laid out as the engine lays them out."""
    c = shape.config
    ops = Ops(c, triton_kernels(c, device, shape.max_model_len, num_sms=shape.num_sms), device)
    named = ((name, torch.empty(s, device=device, dtype=shape.dtype)) for name, s in tensor_shapes(c).items())
    weights = CodeGenWeights.from_named(c, named)
    kv = KVCache(c, shape.table_width, shape.block_size, device, shape.dtype)
    k_cache, v_cache = kv.layer(0)
    return ShapeState(ops, weights, k_cache, v_cache)


def run_step(shape: EngineShape, state: ShapeState, step: Step) -> None:
    """One layer of `CodeGenModel.forward` over the step's inputs: the launches a real step makes, per layer."""
    device = state.k_cache.device

    def zeros(*size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(size, device=device, dtype=dtype)  # valid token ids where the tensors are real

    t, r = step.tokens, step.rows
    # Slices of the model runner's persistent buffers start at their base: as aligned as fresh tensors.
    tensors = dict(
        input_ids=zeros(t, dtype=torch.int64),
        positions=zeros(t, dtype=torch.int64),
        slot_mapping=zeros(t, dtype=torch.int64),
        block_tables=zeros(r, shape.table_width, dtype=torch.int32),
        context_lens=zeros(r, dtype=torch.int32),
        query_start_loc=zeros(r + 1, dtype=torch.int32),
        logits_indices=zeros(r, dtype=torch.int64),
    )
    counts = dict(
        num_rows=r, num_tokens=t, num_samples=r, num_host_sampled=0, num_prompt_logits=0, num_copies=0,
        max_query_len={"decode": 1, "verify": t // r}.get(step.kind, min(t, shape.max_model_len)),
        max_context_len=shape.max_model_len,
        is_decode=step.kind == "decode",
    )  # fmt: skip
    assert set(counts) == set(SHAPE_FIELDS)
    inputs = StepInputs(counts, tensors)
    layer = state.weights.layers[0]
    x = state.weights.wte[inputs.input_ids]
    q, g = state.ops.in_proj(x, layer, inputs, state.k_cache, state.v_cache)
    a = state.ops.attention(q, state.k_cache, state.v_cache, inputs)
    state.ops.out_proj(a, g, layer, x)


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)` call, named 'kernel model dtype tables step'."""

    name: str
    kernel: Any  # the kernel's triton.JITFunction (or its interpreted stand-in)
    grid: tuple
    args: tuple
    kwargs: dict


class Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the call instead of running it."""

    def __init__(self, kernel: Any, name: str, log: list[Launch], tag: list[str]):
        self.kernel, self.name, self.log, self.tag = kernel, name, log, tag

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(
            Launch(f"{self.name} {self.tag[0]}", self.kernel, tuple(grid), args, kwargs)
        )


def kernel_modules() -> list[tuple[Any, str]]:
    """(module, attribute) of every kernel in KERNELS, the modules imported."""
    from fastcodegen.kernels import decode_attention, in_proj, layer_norm, out_proj, prefill_attention, verify_attention

    modules = {
        "layer_norm": layer_norm,
        "in_proj": in_proj,
        "prefill_attention": prefill_attention,
        "decode_attention": decode_attention,
        "verify_attention": verify_attention,
        "out_proj": out_proj,
    }
    return [(modules[m], name) for m, name in KERNELS]


def patch_kernels(make: Callable[[Any, str], Any]) -> Callable[[], None]:
    """Replaces every kernel by make(kernel, name) in its module; returns the function that restores them."""
    kernels = kernel_modules()
    originals = [getattr(module, name) for module, name in kernels]
    for (module, name), kernel in zip(kernels, originals):
        setattr(module, name, make(kernel, name))

    def restore() -> None:
        for (module, name), kernel in zip(kernels, originals):
            setattr(module, name, kernel)

    return restore


def record_launches(shape: EngineShape, steps: Iterable[Step]) -> list[Launch]:
    """The launches of the steps, in order, each named 'kernel model dtype step'."""
    log: list[Launch] = []
    tag = [""]
    restore = patch_kernels(lambda kernel, name: Recorder(kernel, name, log, tag))
    try:
        state = prepare(shape)
        for step in steps:
            tag[0] = f"{shape.describe()} {step}"
            run_step(shape, state, step)
    finally:
        restore()
    return log


@functools.lru_cache(maxsize=None)
def _param_names(fn: Callable) -> tuple[list[str], set[str]]:
    params = inspect.signature(fn).parameters
    constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    return list(params), constexpr


def arguments(launch: Launch) -> tuple[dict[str, Any], dict[str, Any]]:
    """(every kernel parameter's value by name, the compile options num_warps/num_stages) of a launch."""
    params, _ = _param_names(launch.kernel.fn)
    values = dict(zip(params, launch.args))
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values.update(kwargs)
    return values, options


def signature(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a recorded launch, specialised as Triton's JIT would.

    Like the JIT: an integer equal to 1 and None become constants, TMA
    descriptors are typed by element and block shape, and pointers and
    integers divisible by 16 are marked so (which lets loads vectorise).
    Meta tensors have address 0, as aligned as the allocator's.
    """
    params, constexpr = _param_names(launch.kernel.fn)
    values, options = arguments(launch)
    sig, consts, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for i, name in enumerate(params):
        v = values[name]
        if name in constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, TensorDescriptor):  # a TMA descriptor: typed by its element and block shape
            sig[name] = f"tensordesc<{_TYPES[v.base.dtype]}[{', '.join(str(n) for n in v.block_shape)}]>"
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {name}={v!r}")
    return sig, consts, attrs, options


def specialization_key(launch: Launch) -> str:
    """What tells two launches of a kernel apart for the compiler: its name and `signature`."""
    sig, consts, attrs, options = signature(launch)
    return f"{launch.kernel.fn.__name__} {sig} {consts} {attrs} {options}"
