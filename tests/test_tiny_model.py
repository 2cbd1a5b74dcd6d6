"""codegen-tiny-py, the trained checkpoint shipped with the package, against transformers.

A trained model's predictions are peaked, so greedy decoding can be compared
token for token over long generations, and its completions are real code,
so stop patterns meet the text they were made for.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CodeGenForCausalLM
from transformers.models.codegen.tokenization_codegen import CodeGenTokenizer

from conftest import INTERPRETED, KERNEL_DEVICE, hf_greedy, stdlib_sources
from fastcodegen import CODEGEN_STOP_PATTERNS, Engine, SamplingParams
from fastcodegen.registry import bundled_path
from fastcodegen.tokenizer import Tokenizer

TINY = bundled_path("codegen-tiny-py")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from train_tiny import function_headers  # noqa: E402  (the evaluation's own prompts: top-level def headers)

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]


@pytest.fixture(scope="module")
def tiny():
    assert TINY is not None, "the package ships fastcodegen/data/codegen-tiny-py"
    hf = CodeGenForCausalLM.from_pretrained(str(TINY)).float().eval()
    return hf, AutoTokenizer.from_pretrained(str(TINY))


def _hf_greedy(hf, tok, prompt: str, n: int) -> list[int]:
    return hf_greedy(hf, tok(prompt)["input_ids"], n, tokenizer_size=len(tok), eos_token_id=tok.eos_token_id)


def test_found_by_name_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    engine = Engine("codegen-tiny-py", device="cpu", progress=False)
    config = json.loads((TINY / "config.json").read_text())
    c = engine.model_config
    assert (c.n_layer, c.n_embd, c.n_head, c.rotary_dim, c.vocab_size) == tuple(
        config[k] for k in ("n_layer", "n_embd", "n_head", "rotary_dim", "vocab_size")
    )
    assert (TINY / "model.safetensors").stat().st_size < 10 * 2**20


def test_long_greedy_generations_match_transformers(tiny):
    hf, tok = tiny
    engine = Engine("codegen-tiny-py", device="cpu", dtype="float32", backend="torch", progress=False)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=200))
    for prompt, out in zip(PROMPTS, outs):
        expected = _hf_greedy(hf, tok, prompt, 200)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].text == tok.decode(expected, skip_special_tokens=True)


@pytest.mark.skipif(not INTERPRETED, reason="float32 Triton runs in the interpreter only (CUDA: float16/bfloat16)")
def test_triton_backend_matches_transformers(tiny):
    hf, tok = tiny
    engine = Engine(
        "codegen-tiny-py", device=KERNEL_DEVICE, dtype="float32", backend="triton", kv_cache_tokens=1024, progress=False
    )
    out = engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.outputs[0].token_ids == _hf_greedy(hf, tok, PROMPTS[0], 12)


def test_stop_patterns_cut_real_completions_like_codegen(tiny, fresh_seed):
    """Completions of real function headers, cut as CodeGen's truncate_before_pattern cuts prompt + completion."""
    hf, tok = tiny
    engine = Engine("codegen-tiny-py", device="cpu", dtype="float32", backend="torch", progress=False)
    # Fresh headers, and one this model's greedy completion is known to end at a pattern: about a
    # third of completions reach one within 128 tokens, so six random headers alone miss now and then.
    prompts = ["def read_file(path):\n"] + function_headers(stdlib_sources()[40:160], 6, fresh_seed)
    # truncate() cuts at the second top-level def of prompt + completion: the header is the first, so
    # in the completion alone it is the first, which a stop pattern expresses. It also cuts at the
    # second top-level print, which no pattern on the completion can express (the header has none), so
    # both sides cut at the first: a terminal ^print for truncate, a stop pattern for the engine.
    patterns = list(CODEGEN_STOP_PATTERNS) + ["^def", "^print"]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=128, stop_patterns=patterns))
    stopped = 0
    for prompt, out in zip(prompts, outs):
        assert not re.search("^print", prompt, re.MULTILINE)
        full = prompt + tok.decode(_hf_greedy(hf, tok, prompt, 128), skip_special_tokens=False)
        expected = CodeGenTokenizer.truncate(None, full, list(CODEGEN_STOP_PATTERNS) + ["^print"])
        assert expected.startswith(prompt)
        assert out.outputs[0].text == expected[len(prompt) :], prompt
        stopped += out.outputs[0].finish_reason == "stop"
    assert stopped > 0  # real code does reach the patterns


def test_tokenizer_round_trips_on_standard_library_files(tiny, fresh_seed):
    _, tok = tiny
    ours = Tokenizer.from_dir(TINY)
    assert ours.vocab_limit == len(tok)
    files = random.Random(fresh_seed).sample(stdlib_sources(), 30)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = ours.encode(text)
        assert ids == tok(text)["input_ids"], path
        assert ours.decode(ids) == text, path


def test_cli_uses_it_by_default(tiny):
    hf, tok = tiny
    prompt = "def add(a, b):\n"
    env = dict(os.environ)
    cli = Path(sys.executable).parent / "fastcodegen"
    p = subprocess.run(
        [str(cli), "generate", prompt, "--device", "cpu", "--temperature", "0", "--max-tokens", "24"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    full = tok.decode(_hf_greedy(hf, tok, prompt, 24), skip_special_tokens=True)
    assert p.stdout == prompt + CodeGenTokenizer.truncate(None, full, list(CODEGEN_STOP_PATTERNS)) + "\n"
