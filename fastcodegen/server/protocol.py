"""The Completions API: its request body, what the engine runs for it, and the shapes of its answers.

A request body is validated by pydantic in strict mode (a number is not a
string, a bool is not a number) and turned into a `CompletionJob`: the
prompts and one `SamplingParams` for the engine. Bad values come back as a
400 naming the field in `param`, in OpenAI's words where the engine's own
message would name something else.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..sampling_params import CODEGEN_STOP_PATTERNS, SamplingParams
from .errors import APIError, bad_request

# OpenAI's legacy Completions API returns at most this many alternatives per token.
MAX_LOGPROBS = 5
PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
# SamplingParams fields the request passes through under the same name, when the engine has them.
PENALTIES = ("presence_penalty", "frequency_penalty", "logit_bias")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of `POST /v1/completions` (and of the Copilot route): OpenAI's fields, then fastcodegen's.

    Unknown fields are ignored: Copilot clients send `nwo`, `extra` and others that do not apply.
    """

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: Optional[str] = None
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    best_of: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # fastcodegen's own
    top_k: Optional[int] = None
    stop_patterns: Union[str, list[str], None] = None
    codegen_stops: Optional[bool] = False
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = False


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its text, or its token ids."""

    text: Optional[str] = None
    token_ids: Optional[list[int]] = None


@dataclass(frozen=True)
class CompletionJob:
    """What a completion request asks of the engine, and how to answer it."""

    prompts: list[Prompt]
    params: SamplingParams  # what the engine runs: n is best_of when that is larger
    n: int  # choices returned per prompt: the best n of params.n by cumulative logprob
    logprobs: Optional[int]  # what the client asked for (params.logprobs may be set only to rank best_of)
    echo: bool  # with logprobs: the prompt's tokens come first in each choice's logprobs (params.prompt_logprobs)
    scores_only: bool  # max_tokens 0 with echo: the engine draws one token, which the answer leaves out
    stream: bool
    include_usage: bool

    @property
    def ranks(self) -> bool:
        """Whether the choices are the best n of more samples (best_of > n)."""
        return self.params.n > self.n


def parse_completion_request(body: bytes) -> CompletionRequest:
    """The request body, validated; APIError(400) naming the field at fault, or saying the JSON is malformed."""
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}")
    if not first["loc"]:
        return bad_request(f"the request body must be a JSON object: {first['msg']}")
    param = str(first["loc"][0])
    if param == "prompt" and first["type"] != "missing":
        return bad_request(f"prompt must be {PROMPT_SHAPES}", param="prompt")
    where = ".".join(str(x) for x in first["loc"])
    got = "" if first["type"] == "missing" else f", got {first['input']!r}"
    return bad_request(f"{where}: {first['msg']}{got}", param=param)


def completion_job(req: CompletionRequest, max_model_len: int) -> CompletionJob:
    """The engine's prompts and SamplingParams for a request; APIError(400) for a value it cannot take."""
    if req.suffix:
        raise bad_request(
            "suffix is not supported: CodeGen models cannot fill in the middle (send an empty suffix, or none)",
            param="suffix",
        )
    prompts = _prompts(req.prompt)
    n = 1 if req.n is None else req.n
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}", param="n")
    best_of = n if req.best_of is None else req.best_of
    if best_of < n:
        raise bad_request(f"best_of must be at least n ({n}), got {best_of}", param="best_of")
    if req.stream and best_of > n:
        raise bad_request("best_of larger than n cannot be streamed: the best are known only at the end", "best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {req.logprobs}", "logprobs")
    scores_only = req.max_tokens == 0
    if scores_only and not req.echo:
        raise bad_request(
            "max_tokens must be at least 1; 0 is allowed only with echo (to score the prompt), got 0", "max_tokens"
        )
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    patterns = [req.stop_patterns] if isinstance(req.stop_patterns, str) else list(req.stop_patterns or [])
    if req.codegen_stops:
        patterns += [p for p in CODEGEN_STOP_PATTERNS if p not in patterns]
    # best_of > n ranks samples by cumulative logprob, which the engine computes when logprobs are asked for.
    logprobs = req.logprobs if req.logprobs is not None or best_of == n else 0
    kwargs = dict(
        n=best_of,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        # no max_tokens: up to the context end, which ends a completion with "length" anyway
        max_tokens=max_model_len if req.max_tokens is None else 1 if scores_only else req.max_tokens,
        stop=req.stop,
        stop_patterns=patterns,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        seed=req.seed,
        logprobs=logprobs,
        prompt_logprobs=req.logprobs if req.echo else None,
        ignore_eos=bool(req.ignore_eos),
    )
    kwargs.update(_penalties(req))
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        raise bad_request(str(e), param=_param_of(str(e), best_of > n)) from None
    return CompletionJob(
        prompts=prompts,
        params=params,
        n=n,
        logprobs=req.logprobs,
        echo=bool(req.echo),
        scores_only=scores_only,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options is not None and req.stream_options.include_usage),
    )


def _prompts(prompt: Union[str, list]) -> list[Prompt]:
    if isinstance(prompt, str):
        return [Prompt(text=prompt)]
    if not prompt:
        raise bad_request(f"prompt is empty: it must be {PROMPT_SHAPES}", param="prompt")
    if isinstance(prompt[0], str):
        return [Prompt(text=p) for p in prompt]
    if isinstance(prompt[0], int):
        return [Prompt(token_ids=list(prompt))]
    return [Prompt(token_ids=list(ids)) for ids in prompt]


def _penalties(req: CompletionRequest) -> dict:
    """presence_penalty, frequency_penalty and logit_bias, for an engine whose SamplingParams has them."""
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    out = {}
    for name in PENALTIES:
        value = getattr(req, name)  # logit_bias keeps JSON's string keys: SamplingParams reads them
        if value is None:
            continue
        if name not in known:
            if value in (0.0, {}):  # the default: nothing to apply
                continue
            raise bad_request(f"{name} is not supported by this version of fastcodegen", param=name)
        out[name] = value
    return out


def _param_of(message: str, ranks: bool) -> Optional[str]:
    """The request field a SamplingParams or engine message is about (it starts with the field's name)."""
    word = re.match(r"\w+", message)
    name = word.group() if word else ""
    if name == "n" or message.startswith("n="):
        return "best_of" if ranks else "n"
    if name in CompletionRequest.model_fields:
        return name
    return None


def engine_error(e: ValueError, prompt_index: int, num_prompts: int, ranks: bool) -> APIError:
    """The engine refused a prompt (empty, too long, an unknown token id, n above max_num_seqs): a 400.

    The engine numbers the prompt 0, since it gets one at a time; the client's number is `prompt_index`.
    """
    message = str(e)
    if message.startswith("prompt 0"):
        message = (f"prompt {prompt_index}" if num_prompts > 1 else "prompt") + message[len("prompt 0") :]
    param = _param_of(message, ranks) or ("stop" if "stop" in message else "prompt")
    return bad_request(message, param=param)


# ---------------------------------------------------------------------------------------------- answers


def choice_body(index: int, text: str, logprobs: Optional[dict], finish_reason: Optional[str]) -> dict:
    """One choice of a completion or of a stream chunk."""
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(id: str, created: int, model: str, choices: list[dict], usage: Optional[dict]) -> dict:
    """A completion, or (with the choices of one step) a stream chunk: both are `text_completion` objects."""
    body = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


class LegacyLogprobs:
    """One choice's log-probabilities in the Completions API's shape, built as its tokens come.

    `tokens`, `token_logprobs`, `top_logprobs` (token text -> logprob: the most
    likely tokens and the sampled one) and `text_offset` (where each token's
    text starts in the choice's text). A token that is not whole UTF-8 reads
    `bytes:\\xNN...`; special tokens (`<|endoftext|>`) add no text. A token
    without log-probabilities (an echoed prompt's first) has None for both.
    """

    def __init__(self, tokenizer, start: int = 0):
        self._tokenizer = tokenizer
        self._special = tokenizer.special_ids if tokenizer is not None else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._offset = start

    def token_text(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        data = self._tokenizer.token_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def add(self, token_ids: list[int], logprobs: list[Optional[dict[int, float]]]) -> dict:
        """The entries of these tokens (the next ones of the choice), with their log-probabilities."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, alternatives in zip(token_ids, logprobs):
            out["tokens"].append(self.token_text(token))
            if alternatives is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(alternatives.get(token))
                ranked = sorted(alternatives.items(), key=lambda kv: -kv[1])
                out["top_logprobs"].append({self.token_text(t): lp for t, lp in ranked})
            out["text_offset"].append(self._offset)
            if self._tokenizer is not None and token not in self._special:
                self._offset += len(self._utf8.decode(self._tokenizer.token_bytes(token)))
        return out
