"""Finding models: the registry of official names, dummy weights, the local
Hugging Face cache (HF_HUB_CACHE / HF_HOME) without a network, and the errors
for models that are not there.

Nothing is downloaded: caches are fake directory trees built in tmp dirs with
the Hugging Face layout (models--org--name/snapshots/<commit>, refs/main), and
`fastcodegen.hub._download` is replaced wherever a download could be tried.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fastcodegen
import fastcodegen.hub as hub
from conftest import SHAPES, TOKENIZER_SIZE, hf_greedy
from fastcodegen import Engine, ModelNotFoundError, SamplingParams, registry

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEW_TOKENS = 8

# The released checkpoints' config.json values, written out here.
ARCHITECTURES = {
    "350M": dict(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32),
    "2B": dict(n_layer=32, n_embd=2560, n_head=32, rotary_dim=64),
    "6B": dict(n_layer=33, n_embd=4096, n_head=16, rotary_dim=64),
    "16B": dict(n_layer=34, n_embd=6144, n_head=24, rotary_dim=64),
}
OFFICIAL = [f"codegen-{size}-{variant}" for size in ARCHITECTURES for variant in ("nl", "multi", "mono")]


# --------------------------------------------------------------------------- the registry


def test_registry_holds_the_twelve_official_models():
    assert sorted(registry.MODELS) == sorted(OFFICIAL)
    for size, arch in ARCHITECTURES.items():
        for variant in ("nl", "multi", "mono"):
            c = registry.MODELS[f"codegen-{size}-{variant}"]
            assert (c.n_layer, c.n_embd, c.n_head, c.rotary_dim) == (
                arch["n_layer"],
                arch["n_embd"],
                arch["n_head"],
                arch["rotary_dim"],
            ), f"codegen-{size}-{variant}"
            assert c.vocab_size == 51200 and c.n_positions == 2048
            assert c.n_inner == 4 * arch["n_embd"]
            assert c.activation_function == "gelu_new"
            assert c.eos_token_ids == (50256,)


def test_official_name():
    for name in OFFICIAL:
        assert registry.official_name(name) == name
        assert registry.official_name(f"Salesforce/{name}") == name
        assert registry.repo_id(name) == f"Salesforce/{name}"
    for other in ("codegen-2B", "codegen-2B-python", "acme/codegen-2B-mono", "codegen2-1B", "Salesforce/"):
        assert registry.official_name(other) is None


def test_to_hf_config_is_what_transformers_reads(checkpoint):
    """A checkpoint's config.json -> ModelConfig -> to_hf_config() -> transformers' CodeGenConfig: the same model."""
    from transformers import CodeGenConfig

    path, _ = checkpoint("hd80")
    written = json.loads((path / "config.json").read_text())
    ours = fastcodegen.config.ModelConfig.from_hf_config(written)
    theirs = CodeGenConfig(**ours.to_hf_config())
    for key in ("n_layer", "n_embd", "n_head", "rotary_dim", "vocab_size", "n_positions", "layer_norm_epsilon"):
        assert getattr(theirs, key) == written[key], key
    assert (theirs.n_inner or 4 * theirs.n_embd) == (written.get("n_inner") or 4 * written["n_embd"])
    assert theirs.eos_token_id == written["eos_token_id"] and theirs.activation_function == "gelu_new"
    assert fastcodegen.config.ModelConfig.from_hf_config(ours.to_hf_config()) == ours


# --------------------------------------------------------------------------- dummy weights


DUMMY_350M = dict(load_format="dummy", device="cpu", dtype="bfloat16", kv_cache_tokens=2048, progress=False, seed=7)


def test_dummy_350M_engine_builds_offline():
    engine = Engine("codegen-350M-mono", **DUMMY_350M)
    mc = engine.model_config
    arch = ARCHITECTURES["350M"]
    assert (mc.n_layer, mc.n_embd, mc.n_head, mc.rotary_dim) == tuple(arch.values())
    assert mc.vocab_size == 51200 and mc.n_positions == 2048
    d, f, v = 1024, 4096, 51200

    w = engine._runner.model.weights
    assert w.wte.shape == (v, d) and w.wte.dtype == torch.bfloat16
    assert len(w.layers) == 20
    assert w.layers[0].w_in.shape == (3 * d + f, d) and w.layers[0].w_out.shape == (d, d + f)
    assert w.lm_head_weight.shape == (v, d) and w.lm_head_bias.shape == (v,)
    # Random, not zeros: N(0, 0.02) matrices, LayerNorm scales near 1.
    std = w.wte.float().std().item()
    assert 0.015 < std < 0.025
    assert (w.wte != 0).float().mean().item() > 0.99
    assert w.layers[5].w_in.float().std().item() > 0.015
    assert abs(w.layers[0].ln_weight.float().mean().item() - 1.0) < 0.01
    assert not torch.equal(w.layers[0].w_in, w.layers[1].w_in)

    # CodeGen's tokenizer ships with the package: text in and out offline, no id past the tokenizer sampled.
    assert engine.tokenizer is not None and engine.vocab_limit == 50295
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    out = engine.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=params, use_tqdm=False)
    tokens = out[0].outputs[0].token_ids
    assert len(tokens) == 2 and all(0 <= t < 50295 for t in tokens)
    out = engine.generate("def f(x):\n    return x", params, use_tqdm=False)[0]
    assert out.prompt_token_ids == [4299, 277, 7, 87, 2599, 198, 50284, 7783, 2124]
    assert out.outputs[0].text == engine.tokenizer.decode(out.outputs[0].token_ids)

    # The same seed gives the same weights.
    wte, w_in_last = w.wte.clone(), w.layers[-1].w_in[:64].clone()
    del engine, w, out
    again = Engine("codegen-350M-mono", **DUMMY_350M)
    assert torch.equal(again._runner.model.weights.wte, wte)
    assert torch.equal(again._runner.model.weights.layers[-1].w_in[:64], w_in_last)


def test_dummy_weights_depend_on_the_seed(checkpoint):
    """Seeding, on a tiny checkpoint's shapes (cheap): same seed equal, another seed different."""
    path, _ = checkpoint("hd64")

    def wte(seed):
        e = Engine(str(path), load_format="dummy", device="cpu", seed=seed, progress=False)
        assert e.model_config.n_embd == SHAPES["hd64"].n_embd
        return e._runner.model.weights.wte

    a, b, c = wte(0), wte(0), wte(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------- the Hugging Face cache


def _fake_cache(cache: Path, repo: str, source: Path, commit: str = COMMIT) -> Path:
    """`cache` laid out as huggingface_hub does, holding `source`'s files as `repo` at `commit`."""
    entry = cache / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    return snapshot


def _greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [
        o.outputs[0].token_ids
        for o in engine.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    ]


def _assert_matches_transformers(engine: Engine, hf) -> None:
    g = torch.Generator().manual_seed(99)
    prompts = [torch.randint(0, TOKENIZER_SIZE, (n,), generator=g).tolist() for n in (6, 13)]
    for prompt, got in zip(prompts, _greedy(engine, prompts)):
        assert got == hf_greedy(hf, prompt, NEW_TOKENS)


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail(f"tried to download {args}")

    monkeypatch.setattr(hub, "_download", refuse)


def test_repo_id_found_in_HF_HUB_CACHE(checkpoint, tmp_path, monkeypatch, no_download):
    src, hf = checkpoint("hd64")
    cache = tmp_path / "hub"
    snapshot = _fake_cache(cache, "acme/codegen-tiny", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    converted = tmp_path / "fc"
    monkeypatch.setenv("FASTCODEGEN_CACHE", str(converted))
    assert hub.locate("acme/codegen-tiny") == snapshot

    engine = Engine("acme/codegen-tiny", device="cpu", progress=False)
    assert engine.model_config.n_embd == SHAPES["hd64"].n_embd
    assert engine.tokenizer is not None
    _assert_matches_transformers(engine, hf)
    # The conversion went into the engine's cache, not into the Hugging Face cache.
    [meta] = list(converted.rglob("fastcodegen.json"))
    assert json.loads(meta.read_text())["source"]["path"] == str(snapshot)
    assert not list(cache.rglob("fastcodegen.json"))

    # A revision given as the commit hash finds the same snapshot; another does not exist.
    assert hub.locate("acme/codegen-tiny", revision=COMMIT) == snapshot
    with pytest.raises(ModelNotFoundError):
        hub.locate("acme/codegen-tiny", revision="f" * 40)


def test_repo_id_found_under_HF_HOME(checkpoint, tmp_path, monkeypatch, no_download):
    src, hf = checkpoint("hd64")
    home = tmp_path / "hf-home"
    snapshot = _fake_cache(home / "hub", "acme/codegen-tiny", src)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub.hf_cache_dir() == home / "hub"
    assert hub.locate("acme/codegen-tiny") == snapshot
    engine = Engine("acme/codegen-tiny", device="cpu", progress=False)
    _assert_matches_transformers(engine, hf)


def test_official_name_found_in_cache_uses_the_checkpoints_config(checkpoint, tmp_path, monkeypatch, no_download):
    src, hf = checkpoint("hd80")
    cache = tmp_path / "hub"
    snapshot = _fake_cache(cache, "Salesforce/codegen-350M-mono", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hub.locate("codegen-350M-mono") == snapshot
    assert hub.locate("Salesforce/codegen-350M-mono") == snapshot

    engine = Engine("codegen-350M-mono", device="cpu", progress=False)
    shape = SHAPES["hd80"]
    mc = engine.model_config
    assert (mc.n_layer, mc.n_embd, mc.n_head, mc.rotary_dim, mc.vocab_size) == (
        shape.n_layer,
        shape.n_embd,
        shape.n_head,
        shape.rotary_dim,
        shape.vocab_size,
    )
    _assert_matches_transformers(engine, hf)


# --------------------------------------------------------------------------- models that are not there


def test_missing_model_offline(tmp_path, monkeypatch, no_download):
    cache = tmp_path / "empty-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        Engine("codegen-2B-mono", device="cpu", progress=False)
    msg = str(e.value)
    assert "codegen-2B-mono" in msg
    assert "Salesforce/codegen-2B-mono" in msg
    assert str(cache) in msg
    assert "download" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert isinstance(e.value, FileNotFoundError)  # callers catching the builtin still catch it
    assert fastcodegen.ModelNotFoundError is ModelNotFoundError


def test_missing_model_with_download_false_never_downloads(tmp_path, monkeypatch, no_download):
    cache = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError) as e:
        Engine("Salesforce/codegen-2B-mono", device="cpu", download=False, progress=False)
    msg = str(e.value)
    assert "codegen-2B-mono" in msg and "Salesforce/codegen-2B-mono" in msg
    assert str(cache) in msg and "download" in msg


def test_failed_download_is_reported(tmp_path, monkeypatch):
    cache = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def failing(repo, revision, cache_dir):
        calls.append((repo, revision, Path(cache_dir)))
        raise OSError("simulated: network is unreachable")

    monkeypatch.setattr(hub, "_download", failing)
    with pytest.raises(ModelNotFoundError) as e:
        Engine("codegen-2B-mono", device="cpu", progress=False)
    assert calls == [("Salesforce/codegen-2B-mono", None, cache)]
    msg = str(e.value)
    assert "codegen-2B-mono" in msg and "Salesforce/codegen-2B-mono" in msg
    assert "simulated: network is unreachable" in msg and "OSError" in msg
    assert isinstance(e.value.__cause__, OSError)


def test_path_that_does_not_exist(tmp_path, no_download):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        Engine(str(missing), device="cpu", progress=False)
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        Engine("./no-such-model-dir", device="cpu", progress=False)


def test_unknown_bare_name_lists_official_names(no_download):
    with pytest.raises(ModelNotFoundError) as e:
        Engine("codegen-2B", device="cpu", progress=False)
    msg = str(e.value)
    assert "'codegen-2B'" in msg
    for name in OFFICIAL:
        assert name in msg


def test_incomplete_snapshot(checkpoint, tmp_path, monkeypatch, no_download):
    src, _ = checkpoint("hd64")
    only_config = tmp_path / "partial"
    only_config.mkdir()
    shutil.copyfile(src / "config.json", only_config / "config.json")
    cache = tmp_path / "hub"
    snapshot = _fake_cache(cache, "acme/codegen-tiny", only_config)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelNotFoundError) as e:
        Engine("acme/codegen-tiny", device="cpu", progress=False)
    msg = str(e.value)
    assert "incomplete" in msg and str(snapshot) in msg
    assert "acme/codegen-tiny" in msg
