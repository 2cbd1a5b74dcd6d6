"""Shared fixtures: a tiny CodeGen-style tokenizer and random CodeGen checkpoints built by transformers.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the
Python standard library's own files, with CodeGen's 38 whitespace tokens
added after `<|endoftext|>` as in the real vocabulary; checkpoints are
transformers' `CodeGenForCausalLM` with random weights, saved with
`save_pretrained` (or `torch.save` for the `.bin` format transformers no
longer writes).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be
# chosen before any kernel is defined (imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Where kernel tests put their tensors: the CPU in the interpreter, else the GPU.
KERNEL_DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
# The interpreter computes bfloat16 wrongly: bfloat16 kernels are tested on a GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])

import pytest  # noqa: E402

WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
EOS = "<|endoftext|>"
BPE_VOCAB = 400  # learned entries; then <|endoftext|>, then the 38 whitespace runs
TOKENIZER_SIZE = BPE_VOCAB + 1 + len(WHITESPACE_TOKENS)  # 439
EOS_ID = BPE_VOCAB


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """No test reads or writes the user's caches, and nothing is downloaded."""
    root = tmp_path_factory.mktemp("caches")
    saved = {k: os.environ.get(k) for k in ("FASTCODEGEN_CACHE", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HOME")}
    os.environ["FASTCODEGEN_CACHE"] = str(root / "fastcodegen")
    os.environ["HF_HUB_CACHE"] = str(root / "hf-empty")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("HF_HOME", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def stdlib_sources(limit: int | None = None) -> list[Path]:
    """Python files of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    return files[:limit] if limit else files


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def write_tokenizer(out: Path, legacy: bool) -> Path:
    """A CodeGen-style tokenizer in `out`: tokenizer.json (transformers' layout) or the legacy GPT-2 file set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([_read(p) for p in stdlib_sources(12)], trainer)
    bpe.model.save(str(out))
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) == BPE_VOCAB
    vocab[EOS] = EOS_ID
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "added_tokens.json").write_text(json.dumps({t: EOS_ID + 1 + i for i, t in enumerate(WHITESPACE_TOKENS)}))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False, "model_max_length": 2048})
    )
    if not legacy:
        # What transformers writes for this tokenizer: tokenizer.json and its config.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        for f in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
            (out / f).unlink()
        tok.save_pretrained(str(out))
        assert (out / "tokenizer.json").is_file()
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"), legacy=False)


@pytest.fixture(scope="session")
def legacy_tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer-legacy"), legacy=True)


@dataclass(frozen=True)
class Shape:
    """A tiny model mirroring one CodeGen family's head geometry."""

    name: str
    n_embd: int
    n_head: int
    rotary_dim: int
    n_layer: int = 2
    vocab_size: int = 501  # above the tokenizer's 439 ids, and not a multiple of 64
    n_positions: int = 128

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPES = {
    # head_dim 64, rotary 32 as in 350M
    "hd64": Shape("hd64", n_embd=256, n_head=4, rotary_dim=32),
    # head_dim 80 (not a power of two), rotary 64 as in 2B
    "hd80": Shape("hd80", n_embd=320, n_head=4, rotary_dim=64),
    # head_dim 256, rotary 64 as in 6B and 16B
    "hd256": Shape("hd256", n_embd=1024, n_head=4, rotary_dim=64, n_layer=1),
    # rotary over the whole head
    "full-rotary": Shape("full-rotary", n_embd=128, n_head=4, rotary_dim=32, n_layer=3, vocab_size=467),
}


def build_hf_model(shape: Shape, seed: int = 0, init_scale: float = 0.2):
    """A random transformers CodeGen model, its init scaled up so greedy picks are not near-ties."""
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(seed)
    config = CodeGenConfig(
        vocab_size=shape.vocab_size,
        n_positions=shape.n_positions,
        n_ctx=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        rotary_dim=shape.rotary_dim,
        initializer_range=init_scale,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
    )
    model = CodeGenForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def save_checkpoint(model, out: Path, fmt: str = "safetensors", tokenizer: Path | None = None, dtype=None) -> Path:
    """Saves `model` as a transformers checkpoint in one of the formats the converter reads.

    fmt: "safetensors", "sharded-safetensors", "bin", "sharded-bin".
    """
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    if fmt == "safetensors":
        model.save_pretrained(out)
    elif fmt == "sharded-safetensors":
        model.save_pretrained(out, max_shard_size="200KB")
        assert (out / "model.safetensors.index.json").is_file()
    elif fmt in ("bin", "sharded-bin"):
        model.config.save_pretrained(out)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        # Old checkpoints carried the attention's causal-mask buffer along.
        n = model.config.n_positions
        state["transformer.h.0.attn.causal_mask"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        if fmt == "bin":
            torch.save(state, out / "pytorch_model.bin")
        else:
            names = list(state)
            half = len(names) // 2
            weight_map = {}
            for i, part in enumerate((names[:half], names[half:])):
                file = f"pytorch_model-0000{i + 1}-of-00002.bin"
                torch.save({k: state[k] for k in part}, out / file)
                weight_map.update({k: file for k in part})
            (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint directory (to damage or edit without touching the session's)."""
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(path: Path, edit) -> Path:
    """Rewrites `path/model.safetensors` after `edit(tensors)` changes its dict of tensors in place."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    file.unlink()
    save_file(tensors, str(file), metadata={"format": "pt"})
    return path


class CheckpointFactory:
    """Builds (and caches for the session) checkpoints and their transformers models."""

    def __init__(self, root: Path, tokenizer: Path):
        self.root = root
        self.tokenizer = tokenizer
        self._made: dict[tuple, tuple[Path, object]] = {}

    def __call__(self, shape: str | Shape = "hd64", fmt: str = "safetensors", seed: int = 0, dtype=None):
        shape = SHAPES[shape] if isinstance(shape, str) else shape
        key = (shape, fmt, seed, dtype)
        if key not in self._made:
            model = build_hf_model(shape, seed)
            path = self.root / f"{shape.name}-{fmt}-{seed}-{dtype}".replace("torch.", "")
            save_checkpoint(model, path, fmt, self.tokenizer, dtype)
            # The reference is what the checkpoint holds (rounded, if saved in fp16), in fp32.
            self._made[key] = (path, model.float())
        return self._made[key]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer_dir) -> CheckpointFactory:
    """checkpoint(shape, fmt, seed) -> (checkpoint directory, the fp32 transformers model it holds)."""
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"), tokenizer_dir)


def hf_suppress_ids(model, tokenizer_size: int = TOKENIZER_SIZE) -> list[int]:
    """Ids transformers may pick that the engine never samples: beyond the tokenizer."""
    return list(range(tokenizer_size, model.config.vocab_size))


def hf_greedy(
    model,
    prompt: list[int],
    max_new_tokens: int,
    dtype=torch.float32,
    tokenizer_size: int = TOKENIZER_SIZE,
    eos_token_id: int | None = None,
) -> list[int]:
    """transformers' greedy continuation of one prompt (no padding), never picking ids beyond the tokenizer.

    With `eos_token_id`, it ends after that token, as the engine does without ignore_eos.
    """
    m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    out = m.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        suppress_tokens=hf_suppress_ids(model, tokenizer_size),
    )
    return out[0, len(prompt) :].tolist()


# float32 logits of two paths (a cached decode against a recomputed prefill) differ in the last bits: a greedy
# pick between tokens this close may go either way.
NEAR_TIE = 1e-4


def assert_greedy_equal(model, prompt: list[int], got: list[int], max_new_tokens: int) -> None:
    """`got` is transformers' greedy continuation, up to a float32 near-tie: where they first part, both picks
    are within NEAR_TIE of the best logit of transformers' forward over what came before (nothing after is
    compared: the two continuations have parted)."""
    want = hf_greedy(model, prompt, max_new_tokens)
    if got == want:
        return
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert i < min(len(got), len(want)), (got, want)  # one stopped early
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got[:i]])).logits[0, -1, :TOKENIZER_SIZE].float()
    best = logits.max().item()
    assert best - logits[got[i]].item() <= NEAR_TIE and best - logits[want[i]].item() <= NEAR_TIE, (i, got, want)


@pytest.fixture
def engine_factory(checkpoint):
    """engine_factory(shape, **engine kwargs) -> (Engine on the CPU, the transformers model)."""
    from fastcodegen import Engine

    def make(shape="hd64", fmt="safetensors", seed=0, **kwargs):
        path, hf = checkpoint(shape, fmt, seed)
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("progress", False)
        return Engine(str(path), **kwargs), hf

    return make


@pytest.fixture
def fresh_seed() -> int:
    """A new random seed per test run, printed so a failure can be reproduced (FRESH_SEED=... sets it)."""
    seed = int(os.environ.get("FRESH_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"fresh_seed={seed}")
    return seed


# Kernel against its PyTorch reference. Both round at the same points; they
# differ in float32 summation order, which flips the last bit of a rounded
# result now and then: a few units in the last place of the format.
# float32: ~1e-6 seen; float16: 2^-10 = 9.8e-4 spacing, 4 ulp allowed;
# bfloat16: 2^-7 = 7.8e-3 spacing, 4 ulp allowed.
KERNEL_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def random_block_tables(
    context_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator
) -> torch.Tensor:
    """Block tables [B, max_blocks] int32 of distinct, shuffled (non-contiguous) blocks, padded with 0."""
    need = [-(-n // block_size) for n in context_lens]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(context_lens), max(max(need), 1), dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n]
        used += n
    return table


def make_step(*, max_query_len: int, max_context_len: int, is_decode: bool, **tensors: torch.Tensor):
    """A `StepInputs` over the given tensors (input_ids, positions, slot_mapping, block_tables, context_lens,
    query_start_loc, logits_indices), its counts read from their sizes; no block copies, no host sampling."""
    from fastcodegen.step import SHAPE_FIELDS, StepInputs

    shape = dict(
        num_rows=tensors["context_lens"].shape[0],
        num_tokens=tensors["input_ids"].shape[0],
        num_samples=tensors["logits_indices"].shape[0],
        num_host_sampled=0,
        num_prompt_logits=0,
        num_copies=0,
        max_query_len=max_query_len,
        max_context_len=max_context_len,
        is_decode=is_decode,
    )
    assert set(shape) == set(SHAPE_FIELDS)
    return StepInputs(shape, tensors)


class NativeDetokenizer:
    """The engine's detokenizing, one token at a time: a token's bytes through the native UTF-8 decoder.

    The native scheduler appends `Tokenizer.token_bytes` of each token (none
    for a special token it skips) to a sequence's text through this decoder,
    which holds back a character's bytes until it is complete.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        from fastcodegen import _C

        self._tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = _C.Utf8Decoder()

    def add(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id)).decode()

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True).decode()


@contextlib.contextmanager
def poisoned_allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Tensor]]:
    """While open, torch.empty and torch.empty_like return tensors full of NaN (floating point) or of the dtype's
    least value (integers), and the list yielded collects them: a kernel wrapper's outputs start poisoned."""
    empty, empty_like = torch.empty, torch.empty_like
    made: list[torch.Tensor] = []

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        made.append(t)
        return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *args, **kwargs: poisoned(empty(*args, **kwargs)))
        m.setattr(torch, "empty_like", lambda *args, **kwargs: poisoned(empty_like(*args, **kwargs)))
        yield made


def was_poisoned(t: torch.Tensor, made: list[torch.Tensor]) -> bool:
    """Whether t is one of the tensors `poisoned_allocations` made."""
    return any(t.data_ptr() == p.data_ptr() for p in made)


# ----------------------------------------------------------------------------- speculative decoding


def repetitive_prompts(lengths, seed, vocab=TOKENIZER_SIZE) -> list[list[int]]:
    """Prompts that repeat themselves (a segment, then the segment again cut short), so n-grams recur."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        seg = [rng.choice([t for t in range(vocab) if t != EOS_ID]) for _ in range(max(2, n // 2))]
        out.append((seg + seg)[:n])
    return out


def perturb(checkpoint, scale: float, seed: int) -> None:
    """Adds Gaussian noise of `scale` times each weight matrix's spread to a saved checkpoint's matrices."""
    gen = torch.Generator().manual_seed(seed)

    def edit(tensors):
        for t in tensors.values():
            if t.dtype.is_floating_point and t.dim() == 2:
                t += scale * t.std() * torch.randn(t.shape, generator=gen)

    rewrite_weights(checkpoint, edit)


@pytest.fixture(scope="session")
def drafts(tmp_path_factory, tokenizer_dir):
    """Draft checkpoints for the hd64 target (seed 0): itself, itself with perturbed weights, an unrelated model."""
    root = tmp_path_factory.mktemp("drafts")
    target = build_hf_model(SHAPES["hd64"], seed=0)
    same = save_checkpoint(target, root / "same", tokenizer=tokenizer_dir)
    perturbed = save_checkpoint(build_hf_model(SHAPES["hd64"], seed=0), root / "perturbed", tokenizer=tokenizer_dir)
    perturb(perturbed, 0.15, seed=11)
    unrelated = save_checkpoint(build_hf_model(SHAPES["full-rotary"], seed=5), root / "unrelated", tokenizer=tokenizer_dir)
    return {"same": same, "perturbed": perturbed, "unrelated": unrelated}
