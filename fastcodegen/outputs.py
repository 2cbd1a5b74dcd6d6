"""What `Engine.generate` returns: one RequestOutput per prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class CompletionOutput:
    """One completion of a prompt.

    Attributes:
        index: which of the request's `n` completions this is.
        text: the generated text, without a matched stop string or pattern and
            without special tokens (unless skip_special_tokens=False).
        token_ids: the generated token ids, including a token that ended the
            completion (an end-of-text or stop token, or the token that
            completed a stop string).
        finish_reason: "stop" (end-of-text, a stop string, token or pattern),
            "length" (max_tokens or the context end), "abort", "error" (the
            request failed: see RequestOutput.error), or None while still
            running.
        stop_reason: what stopped it: the stop string or pattern matched, or
            the stop token id; None otherwise.
        logprobs: with SamplingParams.logprobs set, one dict per generated
            token mapping token ids (the top `logprobs` and the sampled one) to
            log-probabilities; None otherwise.
        cumulative_logprob: the sum of the sampled tokens' log-probabilities,
            with logprobs set; None otherwise.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Union[str, int, None] = None
    logprobs: Optional[list[dict[int, float]]] = None
    cumulative_logprob: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The completions of one prompt.

    Attributes:
        request_id: the engine's id for the request.
        prompt: the prompt text, when it was given as text.
        prompt_token_ids: the prompt's token ids.
        prompt_logprobs: with SamplingParams.prompt_logprobs set, one entry
            per prompt token: None for the first (nothing precedes it), then
            dicts mapping token ids (the prompt's token and the top
            `prompt_logprobs` at that position) to log-probabilities given
            the tokens before. Complete in every output that carries
            generated tokens (None entries remain only where a request ended
            before its prompt was computed); None without prompt_logprobs.
        outputs: the `n` completions, in index order.
        finished: whether every completion has finished.
        error: why the request failed (its completions then end with
            finish_reason "error"), e.g. the model produced non-finite
            logits; None otherwise.
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: Optional[str] = None
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None


class GenerationError(RuntimeError):
    """Some requests of a `generate` call failed; the others completed.

    Attributes:
        outputs: every RequestOutput of the call, in prompt order; the failed
            ones carry `error` and finish_reason "error".
    """

    def __init__(self, message: str, outputs: list[RequestOutput]):
        super().__init__(message)
        self.outputs = outputs
