"""Runs a scheduled step: its inputs to the device, block copies, the forward (eager or a CUDA graph), sampling.

On CUDA the runner keeps one persistent device buffer per field the device
reads (declared by the native step table, like the host buffers): each step
copies its inputs into them asynchronously from pinned memory, and the CUDA
graphs it captures at start read them. A decode step with R rows replays the
graph of the smallest bucket B >= R, its rows R..B-1 padded on the device
buffers with slot -1 (no K/V store) and context length 0 (attention writes
zeros).

With speculative decoding, a step that is not a decode step but whose every
row has at most k + 1 new tokens (a verify step: each speculating sequence's
last token and its k proposals, beside plain decodes) replays a verify graph:
bucket B was captured with B rows and B * (k + 1) tokens through the verify
attention kernel (or the prefill one past 16 tokens a row), whose grids
depend on those counts alone. Its padding
tokens store nothing and belong to no row; its padding rows have no tokens.
The draft model's decode passes replay graphs of their own (draft.py).
"""

from __future__ import annotations

import gc
import logging
from typing import Optional

import numpy as np
import torch

from .config import EngineConfig, ModelConfig
from .cuda_graphs import CudaGraphs, default_buckets, verify_buckets
from .draft import DraftModel
from .kv_cache import KVCache
from .models.codegen import CodeGenModel
from .models.ops import make_ops
from .request import RequestState
from .sampler import Proposals, Sampled, Sampler, SamplingInputs
from .step import SHAPE_FIELDS, StepBuffers, StepField, StepInputs
from .weights import CodeGenWeights

logger = logging.getLogger("fastcodegen")


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        weights: CodeGenWeights,
        num_blocks: int,
        step_fields: list[StepField],
        vocab_limit: int,
        draft: Optional[tuple[ModelConfig, CodeGenWeights]] = None,
    ):
        """`vocab_limit`: tokens are sampled below it (the tokenizer's ids, at most the model's vocabulary).

        `draft`: a draft model for speculative decoding (its config and weights), run beside the target with a
        KV cache of its own addressed by the same block tables.
        """
        self.device = engine_config.device
        ops = make_ops(model_config, engine_config.backend, self.device, engine_config.max_model_len)
        self.model = CodeGenModel(model_config, weights, ops)
        self.kv_cache = kv = KVCache(
            model_config, num_blocks, engine_config.block_size, self.device, engine_config.dtype
        )
        logger.info("KV cache: %d blocks of %d tokens: %d tokens fit", kv.num_blocks, kv.block_size, kv.num_tokens)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(engine_config.seed)
        self.sampler = Sampler(min(vocab_limit, model_config.vocab_size), generator)
        self.max_model_len = engine_config.max_model_len
        graphed = engine_config.uses_cuda_graphs
        device_fields = [f for f in step_fields if f.on_device]
        self.draft: Optional[DraftModel] = None
        self._proposals: Optional[Proposals] = None  # the last execute()'s draft proposals, for run()
        if draft is not None:
            d_config, d_weights = draft
            d_ops = make_ops(d_config, engine_config.backend, self.device, engine_config.max_model_len)
            d_cache = KVCache(d_config, num_blocks, engine_config.block_size, self.device, engine_config.dtype)
            self.draft = DraftModel(
                CodeGenModel(d_config, d_weights, d_ops), d_cache, self.sampler.vocab_limit, generator,
                StepBuffers(device_fields, self.device) if graphed else None,
            )  # fmt: skip
        self._dev: Optional[StepBuffers] = None
        if self.device.type == "cuda" or graphed:
            self._dev = StepBuffers(device_fields, self.device)
        self.graphs: Optional[CudaGraphs] = None
        self.verify_graphs: Optional[CudaGraphs] = None
        self.verify_query_len = engine_config.num_speculative_tokens + 1  # the verify graphs' longest query
        if graphed:
            pool = CudaGraphs.new_pool()
            self.graphs = CudaGraphs(default_buckets(engine_config.max_num_seqs))
            self.graphs.capture(self.model, self.kv_cache, self._padding_step, pool)
            buckets = verify_buckets(engine_config)
            if buckets:
                self.verify_graphs = CudaGraphs(buckets, f"verify steps of up to {self.verify_query_len} tokens a row")
                self.verify_graphs.capture(self.model, self.kv_cache, self._verify_padding_step, pool)
            if self.draft is not None:
                self.draft.capture(default_buckets(engine_config.max_num_seqs), pool, self.max_model_len)

    def run(self, step: StepInputs, requests: dict[int, RequestState]) -> Sampled:
        """The step's forward and its sampled tokens; `requests` (by scheduler id) own the rows sampled on their terms.

        Completions with penalties count the tokens drawn for them here: every
        sampled token is appended to its sequence by the scheduler's update.
        """
        self._proposals = None
        logits = self.execute(step, requests)
        proposals, self._proposals = self._proposals, None
        inputs = SamplingInputs.of(step, self._on_device(step), requests, self.device)
        inputs.proposals = proposals
        sampled = self.sampler(logits[: step.num_samples], inputs)
        if proposals is not None:  # what the scheduler checks the drawn tokens against
            step.arrays["spec_token"][proposals.rows] = proposals.tokens.cpu().numpy()
        inputs.count(sampled)
        if step.num_prompt_logits:
            sampled.prompt_logprobs = self._score_prompts(step, logits[step.num_samples :], requests)
        return sampled

    def _score_prompts(
        self, step: StepInputs, logits: torch.Tensor, requests: dict[int, RequestState]
    ) -> list[Optional[dict[int, float]]]:
        """The logprobs of the step's prompt rows: row r scores the prompt token after its position."""
        owners = step.arrays["prompt_logits_request"].tolist()
        positions = step.arrays["prompt_logits_position"].tolist()
        rows, tokens, top = [], [], []
        for r, (core_id, p) in enumerate(zip(owners, positions)):
            req = requests.get(core_id)
            if req is not None:  # else removed since the step was scheduled
                rows.append(r)
                tokens.append(req.prompt_token_ids[p + 1])
                top.append(req.params.prompt_logprobs)
        scored = self.sampler.score(logits[rows], np.array(tokens, dtype=np.int64), top)
        out: list[Optional[dict[int, float]]] = [None] * len(owners)
        for r, d in zip(rows, scored):
            out[r] = d
        return out

    @torch.inference_mode()
    def execute(self, step: StepInputs, requests: Optional[dict] = None) -> torch.Tensor:
        """Logits [num_samples + num_prompt_logits, vocab_size] float32: the sampled rows', then the prompt rows'.

        With a draft model, its proposals for the step are made first (on
        `requests`' terms: seeds) and left for `run` in `_proposals`.
        """
        if step.num_copies:
            self._copy_blocks(step.copy_src, step.copy_dst)
        dev = self._upload(step)
        if self.draft is not None:
            self._proposals = self.draft.propose(step, dev, requests or {})
        rows = dev.logits_indices
        if step.num_prompt_logits:
            rows = torch.cat([rows, dev.prompt_logits_indices])
        if self.graphs is not None and step.is_decode and self.graphs.fits(step.num_rows):
            bucket = self.graphs.bucket(step.num_rows)
            self._dev.pad_decode(step.num_rows, bucket)
            logits = self.graphs.replay(bucket)[rows]
        elif self._verify_fits(step):
            bucket = self.verify_graphs.bucket(step.num_rows)
            self._dev.pad_ragged(step.num_rows, step.num_tokens, bucket, bucket * self.verify_query_len)
            logits = self.verify_graphs.replay(bucket)[rows]
        else:
            logits = self.model.compute_logits(self.model.forward(dev, self.kv_cache)[rows])
        if self.draft is not None:
            self.draft.follow(step, dev)
        return logits

    def _verify_fits(self, step: StepInputs) -> bool:
        """Whether a step that is not a decode step replays a verify graph (at most k + 1 new tokens a row)."""
        g = self.verify_graphs
        if g is None or step.is_decode:
            return False
        return step.max_query_len <= self.verify_query_len and g.fits(step.num_rows)

    def _on_device(self, step: StepInputs) -> StepInputs:
        """The step with its device fields as views of the device buffers (the step itself off CUDA)."""
        if self._dev is None:
            return step
        return self._dev.step(step.shape())

    def _upload(self, step: StepInputs) -> StepInputs:
        dev = self._on_device(step)
        if self._dev is not None:
            for name, t in dev.tensors.items():
                t.copy_(step.tensors[name], non_blocking=True)
        return dev

    def _padding_step(self, rows: int) -> StepInputs:
        """A decode step of `rows` padding rows only, on the device buffers (to capture a bucket's graph)."""
        return self._dev.padding_step(rows, rows, 1, self.max_model_len)

    def _verify_padding_step(self, rows: int) -> StepInputs:
        """A verify step of `rows` padding rows and rows * (k + 1) padding tokens, to capture a verify graph."""
        return self._dev.padding_step(rows, rows * self.verify_query_len, self.verify_query_len, self.max_model_len)

    def _copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies whole KV blocks (every layer, K and V): a sample's own copy of a block it shared."""
        src, dst = src.to(self.device), dst.to(self.device)
        self.kv_cache.copy_blocks(src, dst)
        if self.draft is not None:  # its cache is addressed by the same block tables
            self.draft.kv_cache.copy_blocks(src, dst)

    def close(self) -> None:
        """Drops the graphs, the KV cache, the weights and the device buffers; on CUDA their memory returns to the device."""
        for graphs in (self.graphs, self.verify_graphs, self.draft and self.draft.graphs):
            if graphs is not None:
                graphs.close()
        self.graphs = self.verify_graphs = self._dev = self.kv_cache = self.model = self.sampler = self.draft = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
