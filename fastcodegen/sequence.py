"""The state of requests and their completions (sequences) while they run."""

from __future__ import annotations

import enum
from typing import Optional

import torch

from .outputs import CompletionOutput, RequestOutput
from .sampler import SamplingRow
from .sampling_params import SamplingParams
from .stopping import Stop, StopRules
from .tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no KV cache: not started, or preempted
    RUNNING = "running"  # its KV cache blocks are allocated
    FINISHED = "finished"


class Sequence:
    """One completion: prompt plus generated tokens, its KV blocks and its output so far."""

    def __init__(
        self,
        seq_id: int,
        request: "Request",
        index: int,
        generator: Optional[torch.Generator],
        detokenizer: Optional[IncrementalDetokenizer],
    ):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.generator = generator
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self._detokenizer = detokenizer
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.logprobs: Optional[list[dict[int, float]]] = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        p = request.params
        self.sampling_row = SamplingRow(p.temperature, p.top_k, p.top_p, generator, p.logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int, logprobs: Optional[dict[int, float]] = None) -> None:
        """Adds a generated token and applies the stop rules."""
        rules = self.request.rules
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id]
        stop = rules.on_token(token_id)
        if stop is None and self._detokenizer is not None:
            old = len(self.text)
            self.text += self._detokenizer.add(token_id)
            stop = rules.on_text(self.text, old)
        if stop is None:
            stop = rules.on_length(self.num_output_tokens, self.num_tokens)
        if stop is not None:
            self.finish(stop)

    def finish(self, stop: Stop) -> None:
        if stop.cut is not None:
            self.text = self.text[: stop.cut]
        elif self._detokenizer is not None:
            self.text += self._detokenizer.flush()
        self.finish_reason = stop.reason
        self.stop_reason = stop.detail
        self.status = SequenceStatus.FINISHED

    def stable_text(self) -> str:
        """The text that no later token can take back (for streaming)."""
        if self.finished:
            return self.text
        return self.text[: self.request.rules.stable_len(self.text)]

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=self.output_token_ids,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
        )


class Request:
    """A prompt and its `n` completions."""

    def __init__(
        self,
        request_id: str,
        prompt: Optional[str],
        prompt_token_ids: list[int],
        params: SamplingParams,
        rules: StopRules,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.rules = rules
        self.seqs: list[Sequence] = []

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[s.output() for s in self.seqs],
            finished=self.finished,
        )
