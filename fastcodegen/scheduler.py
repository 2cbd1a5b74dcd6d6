"""The step scheduler: the one door from Python to the native one (`fastcodegen._C.Scheduler`).

The native scheduler owns the sequences (tokens, block tables, decoded text)
and decides each step (continuous batching, chunked prefill, prefix cache,
n-sample forks, preemption: csrc/scheduler.h). This module allocates, once,
the host buffers it writes each step's inputs into, from the native table of
the step's fields (pinned on CUDA, so the copies to the device are
asynchronous), binds them by name, and hands out each step's `StepInputs`.
Nothing here loops over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import _C
from .config import EngineConfig
from .sampling_params import SamplingParams
from .step import StepBuffers, StepField, StepInputs
from .tokenizer import Tokenizer

# A step's events: (sequence, request, completion index, sampled row, finish reason, new text bytes).
Event = tuple[int, int, int, int, int, bytes]
FINISH_REASONS: dict[int, str] = dict(_C.FINISH_REASONS)  # finish code -> the finish_reason Python reports


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler: counters since the start, and what runs now."""

    computed_tokens: int  # tokens run through the model
    prefix_hit_tokens: int  # prompt tokens found in the prefix cache
    preemptions: int
    block_copies: int
    spec_runs: int  # sequences that verified proposals in a step (speculative decoding)
    spec_proposed: int  # proposals verified
    spec_accepted: int  # of those, kept
    num_running: int  # sequences
    num_waiting: int
    num_free_blocks: int  # KV blocks no sequence holds (cached prefixes included: they are evictable)
    num_blocks: int

    @property
    def acceptance_rate(self) -> float:
        """The share of verified proposals that were kept (0 without speculation)."""
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Proposals kept per verifying sequence and step (each such step also adds the target's own token)."""
        return self.spec_accepted / self.spec_runs if self.spec_runs else 0.0


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        eos_token_ids: tuple[int, ...],
        tokenizer: Optional[Tokenizer] = None,
    ):
        c = _C.SchedulerConfig()
        c.num_blocks = num_blocks
        c.block_size = config.block_size
        c.max_num_seqs = config.max_num_seqs
        c.max_num_batched_tokens = config.max_num_batched_tokens
        c.max_model_len = config.max_model_len
        c.watermark_blocks = max(1, num_blocks // 100)
        c.enable_prefix_caching = config.enable_prefix_caching
        c.eos_token_ids = list(eos_token_ids)
        c.num_speculative_tokens = config.num_speculative_tokens
        c.ngram_min, c.ngram_max = config.ngram_min, config.ngram_max
        c.speculative_max_rows = config.speculative_max_rows
        c.draft_proposals = config.draft_model is not None
        self._core = _C.Scheduler(c)
        self.fields = [StepField.from_native(row) for row in self._core.step_fields()]
        self._host = StepBuffers(self.fields, torch.device("cpu"), pin=config.device.type == "cuda")
        self._core.bind(self._host.arrays)
        if tokenizer is not None:
            self._core.set_vocabulary(
                [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_limit)], sorted(tokenizer.special_ids)
            )

    # ------------------------------------------------------------------ requests

    def add(self, prompt: list[int], params: SamplingParams, report_tokens: bool) -> int:
        """Queues a request; its scheduler id. `report_tokens`: an event for every token it gets."""
        c = _C.RequestConfig()
        c.n = params.n
        c.max_tokens = params.max_tokens
        c.ignore_eos = params.ignore_eos
        c.skip_special_tokens = params.skip_special_tokens
        c.temperature = params.temperature
        c.top_p = params.top_p
        c.top_k = params.top_k
        c.host_sampled = params.seed is not None or params.logprobs is not None or params.adjusts_logits
        c.report_tokens = report_tokens
        c.prompt_logprobs = params.prompt_logprobs is not None
        # Penalties change each row's logits by the tokens drawn before it: such requests decode one token a step.
        c.speculate = not (params.presence_penalty or params.frequency_penalty)
        c.stop_token_ids = list(params.stop_token_ids)
        c.stop_strings = list(params.stop)
        return self._core.add_request(prompt, c)

    def abort(self, request: int) -> None:
        self._core.abort(request)

    def stop(self, seq: int) -> None:
        """Ends a sequence from outside: a stop pattern matched its text."""
        self._core.stop(seq)

    def remove(self, request: int) -> None:
        """Forgets a request (ending it first if it runs)."""
        self._core.remove_request(request)

    # ------------------------------------------------------------------ a step

    def schedule(self) -> StepInputs:
        """Decides the next step; its inputs, as views of the host buffers."""
        return self._host.step(self._core.schedule().as_dict())

    def update(self, tokens: np.ndarray, finite: np.ndarray) -> list[Event]:
        """Applies the sampled tokens (int32 [S]); rows not `finite` end their request with an error.

        Returns the step's events: a sequence that finished, or that got a
        token of a request that reports its tokens, with the text bytes it
        gained that no later token can take back.
        """
        return self._core.update(tokens, finite)

    # ------------------------------------------------------------------ state

    def has_unfinished(self) -> bool:
        return self._core.has_unfinished()

    def output_tokens(self, seq: int) -> list[int]:
        return self._core.output_tokens(seq)

    def seq_info(self, seq: int) -> dict:
        return self._core.seq_info(seq)

    @property
    def num_running(self) -> int:
        return self._core.num_running

    @property
    def num_waiting(self) -> int:
        return self._core.num_waiting

    @property
    def num_free_blocks(self) -> int:
        return self._core.pool.num_free

    @property
    def stats(self) -> SchedulerStats:
        s, pool = self._core.stats, self._core.pool
        return SchedulerStats(
            s.computed_tokens, s.prefix_hit_tokens, s.preemptions, s.block_copies,
            s.spec_runs, s.spec_proposed, s.spec_accepted, self._core.num_running, self._core.num_waiting, pool.num_free, pool.num_blocks,
        )  # fmt: skip

    def check(self) -> None:
        """Raises if sequences, block references and the block tables disagree (tests and debugging)."""
        self._core.check()
