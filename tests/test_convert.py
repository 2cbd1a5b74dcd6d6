"""Converting transformers CodeGen checkpoints into the engine's fused layout.

Engines built from every source format the converter reads (safetensors and
pytorch_model.bin, single and sharded, float32 and float16) generate greedily
what transformers generates; the converted file holds exactly the tensors
derived in this file, independently of fastcodegen, from the transformers
model; bad sources fail with a ValueError naming the tensor and leave nothing
behind; the command line and the engine's conversion cache work; the streaming
safetensors writer writes files safetensors reads back.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fastcodegen.convert as convert_mod
from conftest import TOKENIZER_SIZE, copy_checkpoint, hf_greedy, rewrite_weights
from fastcodegen import Engine, SamplingParams
from fastcodegen.convert import _StreamingSafetensorsWriter, convert
from fastcodegen.weights import FORMAT_VERSION

NEW_TOKENS = 10
FORMATS = ["safetensors", "sharded-safetensors", "bin", "sharded-bin"]
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _prompts(n_prompts: int = 2, seed: int = 1234) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TOKENIZER_SIZE, (n,), generator=g).tolist() for n in (7, 19)[:n_prompts]]


def _engine_greedy(engine: Engine, prompts: list[list[int]], max_tokens: int = NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _assert_matches_transformers(engine: Engine, hf, prompts=None) -> None:
    prompts = prompts or _prompts()
    ours = _engine_greedy(engine, prompts)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt {prompt}"


# --------------------------------------------------------------------------- the expected layout, derived here


def expected_layout(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The engine's tensors for `model`, built from the layout's definition alone (not fastcodegen's code)."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    c = model.config
    d, nh, rd = c.n_embd, c.n_head, c.rotary_dim
    hd = d // nh
    # Row groups of w_in: [Q1 | K1 | Q2 | K2 | QP | KP | V | M]: the even rotary
    # rows of every head, then the odd ones, then the rows past rotary_dim.
    first = torch.tensor([h * hd + j for h in range(nh) for j in range(0, rd, 2)])
    second = torch.tensor([h * hd + j for h in range(nh) for j in range(1, rd, 2)])
    rest = torch.tensor([h * hd + j for h in range(nh) for j in range(rd, hd)], dtype=torch.long)

    out = {"wte": sd["transformer.wte.weight"]}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        w = sd[p + "attn.qkv_proj.weight"].view(4, 3, d // 4, d)
        q, v, k = (w[:, j].reshape(d, d) for j in range(3))
        fc_in_w, fc_in_b = sd[p + "mlp.fc_in.weight"], sd[p + "mlp.fc_in.bias"]
        out[f"layers.{i}.ln.weight"] = sd[p + "ln_1.weight"]
        out[f"layers.{i}.ln.bias"] = sd[p + "ln_1.bias"]
        out[f"layers.{i}.w_in"] = torch.cat([q[first], k[first], q[second], k[second], q[rest], k[rest], v, fc_in_w])
        out[f"layers.{i}.b_in"] = torch.cat([torch.zeros(3 * d), fc_in_b])
        out[f"layers.{i}.w_out"] = torch.cat([sd[p + "attn.out_proj.weight"], sd[p + "mlp.fc_out.weight"]], dim=1)
        out[f"layers.{i}.b_out"] = sd[p + "mlp.fc_out.bias"]
    out["ln_f.weight"] = sd["transformer.ln_f.weight"]
    out["ln_f.bias"] = sd["transformer.ln_f.bias"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    out["lm_head.bias"] = sd["lm_head.bias"]
    return {k: t.to(dtype) for k, t in out.items()}


def _layout_forward(
    layout: dict[str, torch.Tensor], config, ids: list[int], rotary: str = "half-split"
) -> torch.Tensor:
    """Logits [T, V] of a plain PyTorch CodeGen forward over the layout's tensors (fp32, no cache).

    Per head, q and k are reassembled as [Q1 | Q2 | QP] and rotated in the
    half-split form, pairs (x[i], x[i + rd/2]), the form the layout promises.
    rotary="interleaved" rotates pairs (x[2i], x[2i+1]) instead: CodeGen's
    original form, wrong for the regrouped rows (the test's negative control).
    """
    d, nh, rd = config.n_embd, config.n_head, config.rotary_dim
    hd, half, t = d // nh, config.rotary_dim // 2, len(ids)
    r, pw = nh * half, nh * (hd - rd)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None]  # [T, rd/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [T, 1, rd/2]

    def rotate(x):  # [T, nh, hd]
        rot, rest = x[..., :rd], x[..., rd:]
        if rotary == "half-split":
            a, b = rot[..., :half], rot[..., half:]
            rot = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
        return torch.cat([rot, rest], -1)

    def heads(first, second, rest):
        return torch.cat([first.view(t, nh, half), second.view(t, nh, half), rest.view(t, nh, hd - rd)], -1)

    eps = config.layer_norm_epsilon
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = layout["wte"][torch.tensor(ids)]
    for i in range(config.n_layer):
        h = torch.nn.functional.layer_norm(x, (d,), layout[f"layers.{i}.ln.weight"], layout[f"layers.{i}.ln.bias"], eps)
        y = h @ layout[f"layers.{i}.w_in"].T + layout[f"layers.{i}.b_in"]
        q = rotate(heads(y[:, :r], y[:, 2 * r : 3 * r], y[:, 4 * r : 4 * r + pw]))
        k = rotate(heads(y[:, r : 2 * r], y[:, 3 * r : 4 * r], y[:, 4 * r + pw : 4 * r + 2 * pw]))
        v = y[:, 4 * r + 2 * pw : 4 * r + 2 * pw + d].view(t, nh, hd)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, d)
        mlp = torch.nn.functional.gelu(y[:, 3 * d :], approximate="tanh")  # gelu_new
        x = x + torch.cat([attn, mlp], -1) @ layout[f"layers.{i}.w_out"].T + layout[f"layers.{i}.b_out"]
    x = torch.nn.functional.layer_norm(x, (d,), layout["ln_f.weight"], layout["ln_f.bias"], eps)
    return x @ layout["lm_head.weight"].T + layout["lm_head.bias"]


@pytest.mark.parametrize("shape", ["hd64", "hd80", "full-rotary"])
def test_expected_layout_is_transformers_attention(checkpoint, shape, fresh_seed):
    """The layout derived above, run by a plain PyTorch forward, gives transformers' logits.

    transformers is used through its public output only (the model's logits),
    so the expected tensors mean something whatever its internals look like:
    the qkv untangling, the rotary regrouping (rotary dims below and equal to
    the head dim), V, out_proj and the MLP columns all feed the logits.
    """
    _, hf = checkpoint(shape)
    c = hf.config
    layout = expected_layout(hf, torch.float32)
    g = torch.Generator().manual_seed(fresh_seed)
    ids = torch.randint(0, c.vocab_size, (23,), generator=g).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
        got = _layout_forward(layout, c, ids)
        wrong = _layout_forward(layout, c, ids, rotary="interleaved")
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
    # The comparison can tell rotary styles apart: rotating the regrouped rows CodeGen's way is far off.
    assert (wrong - want).abs().max().item() > 1e-2 * scale


# --------------------------------------------------------------------------- engines from each format


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_from_each_format_matches_transformers(checkpoint, fmt):
    path, hf = checkpoint("hd64", fmt)
    if fmt.endswith("bin"):
        # The stray buffer is really there, and must be ignored.
        files = sorted(path.glob("pytorch_model*.bin"))
        names = set().union(*(torch.load(f, weights_only=True).keys() for f in files))
        assert "transformer.h.0.attn.causal_mask" in names
    if fmt.startswith("sharded"):
        assert len(list(path.glob("*.safetensors")) + list(path.glob("*.bin"))) >= 2
    engine = Engine(str(path), device="cpu", dtype="float32", progress=False)
    _assert_matches_transformers(engine, hf)


def test_engine_from_float16_checkpoint_matches_transformers(checkpoint):
    path, hf = checkpoint("hd64", "safetensors", dtype=torch.float16)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("transformer.h.0.attn.qkv_proj.weight").dtype == torch.float16
    # hf holds the float16 values in float32: both sides compute in float32 from the same weights.
    engine = Engine(str(path), device="cpu", dtype="float32", progress=False)
    _assert_matches_transformers(engine, hf)


# --------------------------------------------------------------------------- the converted file


def _read_all(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize(
    "source_dtype, dtype, stored",
    [
        (None, "auto", torch.float32),
        (torch.float16, "auto", torch.float16),
        (None, "bfloat16", torch.bfloat16),
        (None, "float16", torch.float16),
        (torch.float16, "float32", torch.float32),
    ],
    ids=["fp32-auto", "fp16-auto", "fp32-to-bf16", "fp32-to-fp16", "fp16-to-fp32"],
)
def test_convert_writes_the_layout(checkpoint, tmp_path, source_dtype, dtype, stored):
    src, hf = checkpoint("hd64", "safetensors", dtype=source_dtype)
    dst = tmp_path / "converted"
    assert convert(src, dst, dtype=dtype, progress=False) == dst

    meta = json.loads((dst / "fastcodegen.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["dtype"] == str(stored).removeprefix("torch.")
    assert meta["model"]["n_embd"] == hf.config.n_embd and meta["model"]["n_layer"] == hf.config.n_layer
    # Tokenizer files travel along.
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    got, _ = _read_all(dst / "model.safetensors")
    expected = expected_layout(hf, stored)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == stored, name
        assert got[name].shape == want.shape, name
        assert torch.equal(got[name], want), name
    # The raw header agrees about the dtype too.
    header_len = int.from_bytes((dst / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((dst / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {SAFETENSORS_DTYPE[stored]}


@pytest.mark.parametrize("fmt", ["sharded-safetensors", "bin"])
def test_convert_other_formats_write_the_same_layout(checkpoint, tmp_path, fmt):
    src, hf = checkpoint("full-rotary", fmt)
    dst = convert(src, tmp_path / "c", progress=False)
    got, _ = _read_all(dst / "model.safetensors")
    expected = expected_layout(hf, torch.float32)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert torch.equal(got[name], want), name


def test_converted_directory_loads_without_reconverting(checkpoint, tmp_path, monkeypatch):
    src, hf = checkpoint("hd80")
    dst = convert(src, tmp_path / "c", progress=False)
    cache = tmp_path / "cache"
    monkeypatch.setattr(
        convert_mod, "convert", lambda *a, **k: pytest.fail("a converted directory was converted again")
    )
    engine = Engine(str(dst), device="cpu", progress=False, cache_dir=str(cache))
    assert not cache.exists()
    _assert_matches_transformers(engine, hf)


# --------------------------------------------------------------------------- bad sources


def _assert_nothing_left(dst: Path) -> None:
    assert not dst.exists()
    parent = dst.parent
    if parent.exists():
        left = [p.name for p in parent.iterdir()]
        assert not [n for n in left if n.startswith(f".{dst.name}.partial-")], left
        assert left == [], left


def _missing(t):
    del t["transformer.h.1.mlp.fc_in.bias"]


def _misshapen(t):
    t["transformer.h.0.attn.out_proj.weight"] = t["transformer.h.0.attn.out_proj.weight"][:, :-8].contiguous()


def _extra(t):
    t["transformer.h.1.mlp.gate_proj.weight"] = torch.zeros(4, 4)


@pytest.mark.parametrize(
    "edit, tensor, words",
    [
        (_missing, "transformer.h.1.mlp.fc_in.bias", "missing"),
        (_misshapen, "transformer.h.0.attn.out_proj.weight", "shape"),
        (_extra, "transformer.h.1.mlp.gate_proj.weight", "unexpected"),
    ],
    ids=["missing", "wrong-shape", "extra"],
)
def test_bad_tensors_raise_and_leave_nothing(checkpoint, tmp_path, edit, tensor, words):
    src, _ = checkpoint("hd64")
    bad = rewrite_weights(copy_checkpoint(src, tmp_path / "bad"), edit)
    dst = tmp_path / "out" / "converted"
    dst.parent.mkdir()
    with pytest.raises(ValueError) as e:
        convert(bad, dst, progress=False)
    assert tensor in str(e.value) and words in str(e.value)
    _assert_nothing_left(dst)


def test_bad_shape_message_gives_both_shapes(checkpoint, tmp_path):
    src, hf = checkpoint("hd64")
    bad = rewrite_weights(copy_checkpoint(src, tmp_path / "bad"), _misshapen)
    with pytest.raises(ValueError) as e:
        convert(bad, tmp_path / "out", progress=False)
    d = hf.config.n_embd
    assert str([d, d - 8]) in str(e.value) and str([d, d]) in str(e.value)


def test_bin_with_missing_tensor_raises(checkpoint, tmp_path):
    src, _ = checkpoint("hd64", "bin")
    bad = copy_checkpoint(src, tmp_path / "bad")
    state = torch.load(bad / "pytorch_model.bin", weights_only=True)
    del state["lm_head.bias"]
    torch.save(state, bad / "pytorch_model.bin")
    dst = tmp_path / "out" / "c"
    with pytest.raises(ValueError, match="lm_head.bias"):
        convert(bad, dst, progress=False)
    _assert_nothing_left(dst)


def test_other_architecture_raises(checkpoint, tmp_path):
    src, _ = checkpoint("hd64")
    bad = copy_checkpoint(src, tmp_path / "gptj")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gptj"
    cfg["architectures"] = ["GPTJForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out" / "c"
    with pytest.raises(ValueError, match="gptj"):
        convert(bad, dst, progress=False)
    _assert_nothing_left(dst)


def test_missing_shard_raises(checkpoint, tmp_path):
    src, _ = checkpoint("hd64", "sharded-safetensors")
    bad = copy_checkpoint(src, tmp_path / "bad")
    weight_map = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[-1]
    (bad / shard).unlink()
    dst = tmp_path / "out" / "c"
    with pytest.raises(FileNotFoundError, match=shard):
        convert(bad, dst, progress=False)
    _assert_nothing_left(dst)


def test_failure_while_writing_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    src, _ = checkpoint("hd64")
    real = convert_mod.convert_layer
    calls = []

    def failing(source, i, dtype):
        calls.append(i)
        if i == 1:
            raise RuntimeError("simulated failure in layer 1")
        return real(source, i, dtype)

    monkeypatch.setattr(convert_mod, "convert_layer", failing)
    dst = tmp_path / "out" / "c"
    with pytest.raises(RuntimeError, match="simulated failure"):
        convert(src, dst, progress=False)
    assert calls == [0, 1]  # the failure really came in the middle of writing
    _assert_nothing_left(dst)


def test_failure_while_overwriting_keeps_the_old_directory(checkpoint, tmp_path, monkeypatch):
    src, _ = checkpoint("hd64")
    dst = convert(src, tmp_path / "out" / "c", progress=False)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    def failing(source, i, dtype):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(convert_mod, "convert_layer", failing)
    with pytest.raises(RuntimeError):
        convert(src, dst, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert [p.name for p in dst.parent.iterdir()] == ["c"]


def test_existing_destination(checkpoint, tmp_path):
    src, hf = checkpoint("hd64")
    dst = tmp_path / "dst"
    dst.mkdir()
    convert(src, dst, progress=False)  # an empty directory is fine
    assert (dst / "fastcodegen.json").is_file()

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert(src, other, progress=False)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    convert(src, other, progress=False, overwrite=True)
    assert not (other / "keep.txt").exists()
    assert (other / "fastcodegen.json").is_file() and (other / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- command line


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=dict(os.environ), timeout=120)


def test_module_command_line(checkpoint, tmp_path):
    src, hf = checkpoint("hd64")
    dst = tmp_path / "cli"
    r = _run([sys.executable, "-m", "fastcodegen.convert", str(src), str(dst), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert json.loads((dst / "fastcodegen.json").read_text())["format_version"] == FORMAT_VERSION
    cache = tmp_path / "cache"
    engine = Engine(str(dst), device="cpu", progress=False, cache_dir=str(cache))
    assert not cache.exists()  # already converted: nothing converted again
    _assert_matches_transformers(engine, hf)

    r = _run([sys.executable, "-m", "fastcodegen.convert", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--quiet"])
    assert r.returncode == 2
    assert "error" in r.stderr and "nowhere" in r.stderr
    assert not (tmp_path / "x").exists()


def test_console_script(checkpoint, tmp_path):
    exe = Path(sys.executable).parent / "fastcodegen"
    assert exe.is_file(), "the fastcodegen console script is not installed next to the interpreter"
    src, hf = checkpoint("hd64")
    dst = tmp_path / "cli"
    r = _run([str(exe), "convert", str(src), str(dst), "--quiet", "--dtype", "float16"])
    assert r.returncode == 0, r.stderr
    meta = json.loads((dst / "fastcodegen.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["dtype"] == "float16"
    # fp32 engine over fp16-stored weights: transformers over the same rounded weights.
    engine = Engine(str(dst), device="cpu", dtype="float32", progress=False)
    rounded = copy.deepcopy(hf).half().float()
    _assert_matches_transformers(engine, rounded)

    # An existing destination needs --force.
    r = _run([str(exe), "convert", str(src), str(dst), "--quiet"])
    assert r.returncode == 2 and "exists" in r.stderr
    assert json.loads((dst / "fastcodegen.json").read_text())["dtype"] == "float16"

    bad = rewrite_weights(copy_checkpoint(src, tmp_path / "bad"), _missing)
    r = _run([str(exe), "convert", str(bad), str(tmp_path / "y"), "--quiet"])
    assert r.returncode == 2
    assert "error" in r.stderr and "transformer.h.1.mlp.fc_in.bias" in r.stderr
    assert not (tmp_path / "y").exists()


# --------------------------------------------------------------------------- conversion on first use


def _converted_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("fastcodegen.json")) if root.exists() else []


def test_engine_converts_once_into_the_cache(checkpoint, tmp_path, monkeypatch):
    src, hf = checkpoint("hd64")
    cache = tmp_path / "fc-cache"
    monkeypatch.setenv("FASTCODEGEN_CACHE", str(cache))
    src_before = sorted(p.name for p in src.iterdir())

    real = convert_mod.convert
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "convert", counting)
    first = Engine(str(src), device="cpu", dtype="float32", progress=False)
    assert len(calls) == 1
    [converted] = _converted_dirs(cache)
    assert json.loads((converted / "fastcodegen.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in src.iterdir()) == src_before  # the source is left alone
    expected_tokens = _engine_greedy(first, _prompts())
    del first

    def refuse(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the conversion")

    monkeypatch.setattr(convert_mod, "convert", refuse)
    second = Engine(str(src), device="cpu", dtype="float32", progress=False)
    assert _engine_greedy(second, _prompts()) == expected_tokens
    assert _converted_dirs(cache) == [converted]

    # Another dtype is another cache entry.
    monkeypatch.setattr(convert_mod, "convert", counting)
    Engine(str(src), device="cpu", dtype="bfloat16", progress=False)
    assert len(calls) == 2
    dirs = _converted_dirs(cache)
    assert len(dirs) == 2 and converted in dirs
    [bf16] = [d for d in dirs if d != converted]
    assert json.loads((bf16 / "fastcodegen.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(bf16 / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("wte").dtype == torch.bfloat16
    assert not [p for p in cache.rglob(".*partial*")]


def test_stale_cached_conversion_is_redone(checkpoint, tmp_path, monkeypatch):
    src, hf = checkpoint("hd64")
    cache = tmp_path / "cache"
    Engine(str(src), device="cpu", progress=False, cache_dir=str(cache))
    [converted] = _converted_dirs(cache)
    meta = json.loads((converted / "fastcodegen.json").read_text())
    meta["format_version"] = 0  # written by an older fastcodegen
    (converted / "fastcodegen.json").write_text(json.dumps(meta))

    real = convert_mod.convert
    calls = []
    monkeypatch.setattr(convert_mod, "convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    engine = Engine(str(src), device="cpu", progress=False, cache_dir=str(cache))
    assert len(calls) == 1
    assert _converted_dirs(cache) == [converted]
    assert json.loads((converted / "fastcodegen.json").read_text())["format_version"] == FORMAT_VERSION
    _assert_matches_transformers(engine, hf)

    # Pointed at directly, an old conversion is refused with a hint rather than misread.
    old = copy_checkpoint(converted, tmp_path / "old")
    (old / "fastcodegen.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="convert the checkpoint again"):
        Engine(str(old), device="cpu", progress=False, cache_dir=str(cache))


def test_engine_cache_dir_argument(checkpoint, tmp_path, monkeypatch):
    src, hf = checkpoint("hd64")
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv("FASTCODEGEN_CACHE", str(env_cache))
    cache = tmp_path / "explicit"
    engine = Engine(str(src), device="cpu", dtype="float32", progress=False, cache_dir=str(cache))
    assert len(_converted_dirs(cache)) == 1
    assert not env_cache.exists()
    _assert_matches_transformers(engine, hf)

    monkeypatch.setattr(convert_mod, "convert", lambda *a, **k: pytest.fail("converted again"))
    again = Engine(str(src), device="cpu", dtype="float32", progress=False, cache_dir=str(cache))
    _assert_matches_transformers(again, hf)


def test_changed_checkpoint_is_converted_again(checkpoint, tmp_path, monkeypatch):
    """A checkpoint rewritten in place must not be served from a stale conversion."""
    src0, hf0 = checkpoint("hd64", seed=0)
    src1, hf1 = checkpoint("hd64", seed=1)
    src = copy_checkpoint(src0, tmp_path / "ckpt")
    cache = tmp_path / "cache"
    e0 = Engine(str(src), device="cpu", progress=False, cache_dir=str(cache))
    _assert_matches_transformers(e0, hf0)
    shutil.copyfile(src1 / "model.safetensors", src / "model.safetensors")
    os.utime(src / "model.safetensors", ns=(1, 1))  # a different mtime, whatever the clock says
    e1 = Engine(str(src), device="cpu", progress=False, cache_dir=str(cache))
    _assert_matches_transformers(e1, hf1)


# --------------------------------------------------------------------------- the streaming writer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_streaming_writer_round_trips(tmp_path, dtype):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(3, 5, 7, generator=g).to(dtype),
        "b.weight": torch.randn(1, generator=g).to(dtype),
        "c": torch.randn(13, generator=g).to(dtype),  # 13 * 2 bytes: later offsets not 8-aligned
        "d": torch.randn(11, 3, generator=g).to(dtype).T,  # not contiguous
        "e": torch.randn(2, 1, 9, 1, generator=g).to(dtype),
    }
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    file = tmp_path / "w.safetensors"
    w = _StreamingSafetensorsWriter(file, shapes, dtype, {"format": "pt", "note": "x"})
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    back = load_file(str(file))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    # The file is exactly header + data, nothing more.
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert file.stat().st_size == 8 + header_len + data


def test_streaming_writer_rejects_wrong_tensors(tmp_path):
    shapes = {"a": (2, 3), "b": (4,)}
    w = _StreamingSafetensorsWriter(tmp_path / "1.safetensors", shapes, torch.float32, {})
    try:
        with pytest.raises(AssertionError):
            w.write("b", torch.zeros(4))  # out of order / wrong name
    finally:
        w._file.close()

    w = _StreamingSafetensorsWriter(tmp_path / "2.safetensors", shapes, torch.float32, {})
    try:
        with pytest.raises(AssertionError):
            w.write("a", torch.zeros(3, 2))  # wrong shape
    finally:
        w._file.close()

    w = _StreamingSafetensorsWriter(tmp_path / "3.safetensors", shapes, torch.float32, {})
    try:
        with pytest.raises(AssertionError):
            w.write("a", torch.zeros(2, 3, dtype=torch.float16))  # wrong dtype
    finally:
        w._file.close()

    w = _StreamingSafetensorsWriter(tmp_path / "4.safetensors", shapes, torch.float32, {})
    w.write("a", torch.zeros(2, 3))
    with pytest.raises(AssertionError):
        w.close()  # "b" never written
    w._file.close()

    w = _StreamingSafetensorsWriter(tmp_path / "5.safetensors", shapes, torch.float32, {})
    w.write("a", torch.zeros(2, 3))
    w.write("b", torch.zeros(4))
    with pytest.raises(AssertionError):
        w.write("c", torch.zeros(1))  # one too many
    w.close()
