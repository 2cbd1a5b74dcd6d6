"""One completion request, from its job to its answer: a `text_completion` body, or a stream of server-sent events.

Prompt p's sample i is choice p * n + i, as OpenAI numbers them. A streamed
choice gets a chunk for each step that grew its text (the new text), the last
one with its finish_reason; their concatenation is the text a non-streamed
request with the same seed gets. With echo, the prompt's text comes first (a
chunk of its own), and with logprobs too, its tokens lead the choice's
logprobs (the first with None): that chunk waits for the prompt's first
output, which carries the prompt's log-probabilities. max_tokens 0 (with echo)
answers with the prompt alone: the one token the engine draws is left out.
A client that goes away (a closed stream, or a dropped connection while a
non-streamed request runs) has its requests aborted before the engine's next
step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..outputs import CompletionOutput, RequestOutput
from .engine_loop import Ended, EngineLoop, Overloaded, PromptRejected, ShuttingDown, Submission
from .errors import SERVER_ERROR, APIError, bad_request, error_body, overloaded
from .metrics import RequestTracker, ServerMetrics
from .protocol import (
    CompletionJob,
    LegacyLogprobs,
    Prompt,
    choice_body,
    completion_body,
    engine_error,
    usage_body,
)

# The status a response gets when nobody is left to read it (nginx's "client closed request").
CLIENT_CLOSED = 499


@dataclass
class Completer:
    """What a completion request needs of the app: the engine loop, the metrics, the model's name."""

    engine_loop: EngineLoop
    metrics: ServerMetrics
    model_name: str

    async def __call__(self, request: Request, job: CompletionJob) -> Response:
        """Submits the job and answers it (a 400, 500 or 503 as an APIError when it cannot run)."""
        start = time.monotonic()
        if len(job.prompts) > self.engine_loop.max_waiting:
            raise bad_request(
                f"{len(job.prompts)} prompts are more than this server lets wait at once ({self.engine_loop.max_waiting})",
                param="prompt",
            )
        try:
            sub = await self.engine_loop.submit(job.prompts, job.params)
        except (Overloaded, ShuttingDown) as e:
            raise overloaded(str(e)) from None
        except PromptRejected as e:
            raise engine_error(e.error, e.prompt_index, len(job.prompts), job.ranks) from None
        try:
            tokenizer = self.engine_loop.engine.tokenizer
            answer = _Answer(
                job, f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name, self.metrics.tracker(start),
                [_echo_text(p, tokenizer) if job.echo else "" for p in job.prompts], tokenizer,
            )  # fmt: skip
            if job.stream:
                return EventStream(answer.events(sub), on_close=lambda: self.engine_loop.cancel(sub))
            return await self._whole(request, sub, answer)
        except BaseException:
            self.engine_loop.cancel(sub)  # whatever went wrong, nothing is left running
            raise

    async def _whole(self, request: Request, sub: Submission, answer: "_Answer") -> Response:
        """The whole completion as one body, unless the client goes away first."""
        getter = asyncio.ensure_future(answer.collect(sub))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not getter.done():
                getter.cancel()
                self.engine_loop.cancel(sub)
        if getter not in done:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(answer.body(getter.result()))


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the request's body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _echo_text(prompt: Prompt, tokenizer) -> str:
    if prompt.text is not None:
        return prompt.text
    return tokenizer.decode(prompt.token_ids, skip_special_tokens=False) if tokenizer is not None else ""


@dataclass
class _ChoiceState:
    """How much of a streamed choice was sent."""

    logprobs: LegacyLogprobs
    echoed: bool = False
    chars: int = 0
    tokens: int = 0
    done: bool = False


@dataclass
class _Answer:
    """Builds a job's answer from its news."""

    job: CompletionJob
    id: str
    created: int
    model: str
    tracker: RequestTracker
    echo: list[str]  # per prompt: the text prepended to its choices ("" without echo)
    tokenizer: object

    def _prompt_logprobs(self, out: RequestOutput) -> Optional[dict]:
        """The echoed prompt's logprobs entries (echo with logprobs), or None."""
        if not self.job.echo or self.job.logprobs is None:
            return None
        return LegacyLogprobs(self.tokenizer).add(out.prompt_token_ids, out.prompt_logprobs)

    def _logprobs(self, p: int, prompt: Optional[dict], c: CompletionOutput) -> Optional[dict]:
        """A whole choice's logprobs: the echoed prompt's entries, then its tokens' (none when scores_only)."""
        if self.job.logprobs is None:
            return None
        own = LegacyLogprobs(self.tokenizer, len(self.echo[p]))
        lp = own.add(*([], []) if self.job.scores_only else (c.token_ids, c.logprobs))
        return lp if prompt is None else {k: prompt[k] + lp[k] for k in lp}

    def _chunk(self, choices: list[dict], usage: Optional[dict] = None) -> str:
        body = completion_body(self.id, self.created, self.model, choices, usage)
        if self.job.include_usage and usage is None:
            body["usage"] = None  # as OpenAI's chunks have it: only the last one carries usage
        return f"data: {json.dumps(body)}\n\n"

    # ------------------------------------------------------------------ non-streamed

    async def collect(self, sub: Submission) -> dict[int, RequestOutput]:
        """Every prompt's finished output; APIError if the server stops or the engine fails first."""
        finals: dict[int, RequestOutput] = {}
        while len(finals) < len(self.job.prompts):
            news = await sub.news.get()
            if isinstance(news, Ended):
                if news.reason == "shutdown":
                    raise overloaded(news.message)
                raise APIError(500, news.message, type=SERVER_ERROR)
            self.tracker.observe(news)
            finals.update((p, out) for p, out in news.outputs if out.finished)
        failed = [out.error for out in finals.values() if out.error is not None]
        if failed:
            raise APIError(500, "; ".join(failed), type=SERVER_ERROR)
        return finals

    def body(self, finals: dict[int, RequestOutput]) -> dict:
        """The `text_completion` object of finished outputs."""
        job, choices = self.job, []
        for p in range(len(job.prompts)):
            prompt_lp = self._prompt_logprobs(finals[p])
            for i, c in enumerate(self._best(finals[p].outputs)):
                lp = self._logprobs(p, prompt_lp, c)
                if job.scores_only:
                    choices.append(choice_body(p * job.n + i, self.echo[p], lp, "length"))
                else:
                    choices.append(choice_body(p * job.n + i, self.echo[p] + c.text, lp, c.finish_reason))
        usage = usage_body(
            sum(len(out.prompt_token_ids) for out in finals.values()),
            # every sample generated, the ones best_of left out included: they were computed (as OpenAI counts)
            0 if job.scores_only else sum(len(c.token_ids) for out in finals.values() for c in out.outputs),
        )
        return completion_body(self.id, self.created, self.model, choices, usage)

    def _best(self, outputs: list[CompletionOutput]) -> list[CompletionOutput]:
        outputs = sorted(outputs, key=lambda c: c.index)
        if not self.job.ranks or self.job.scores_only:  # nothing generated to rank by: the first n
            return outputs[: self.job.n]
        return sorted(outputs, key=lambda c: -c.cumulative_logprob)[: self.job.n]  # stable: ties keep index order

    # ------------------------------------------------------------------ streamed

    async def events(self, sub: Submission) -> AsyncIterator[str]:
        """The server-sent events of a streamed job, `data: [DONE]` last."""
        job, n = self.job, self.job.n
        states = {
            (p, i): _ChoiceState(LegacyLogprobs(self.tokenizer, len(self.echo[p])))
            for p in range(len(job.prompts))
            for i in range(n)
        }
        prompt_tokens: dict[int, int] = {}
        prompt_logprobs: dict[int, Optional[dict]] = {}  # per prompt, built once for its n echo chunks
        completion_tokens: dict[tuple[int, int], int] = {}
        # The echo chunks go first; with logprobs, each waits for its prompt's first output, which scores it.
        if job.echo and job.logprobs is None:
            for (p, i), st in states.items():
                st.echoed = True
                yield self._chunk([choice_body(p * n + i, self.echo[p], None, None)])
        remaining = len(states)
        while remaining:
            news = await sub.news.get()
            if isinstance(news, Ended):
                reason = "abort" if news.reason == "shutdown" else "error"
                for (p, i), st in states.items():
                    if not st.done:
                        yield self._chunk([choice_body(p * n + i, "" if st.echoed else self.echo[p], None, reason)])
                if news.reason == "error":
                    yield f"data: {json.dumps(error_body(news.message, type=SERVER_ERROR))}\n\n"
                break
            self.tracker.observe(news)
            for p, out in news.outputs:
                prompt_tokens[p] = len(out.prompt_token_ids)
                for c in out.outputs:
                    st = states[(p, c.index)]
                    if not st.echoed and job.echo:
                        st.echoed = True
                        if p not in prompt_logprobs:
                            prompt_logprobs[p] = self._prompt_logprobs(out)
                        yield self._chunk([choice_body(p * n + c.index, self.echo[p], prompt_logprobs[p], None)])
                    if job.scores_only:
                        completion_tokens[(p, c.index)] = 0
                        if not st.done and c.finish_reason is not None:
                            st.done, remaining = True, remaining - 1
                            lp = None if job.logprobs is None else st.logprobs.add([], [])
                            yield self._chunk([choice_body(p * n + c.index, "", lp, "length")])
                        continue
                    completion_tokens[(p, c.index)] = len(c.token_ids)
                    if st.done or (len(c.text) == st.chars and c.finish_reason is None):
                        continue
                    lp = None
                    if job.logprobs is not None:
                        lp = st.logprobs.add(c.token_ids[st.tokens :], c.logprobs[st.tokens :])
                    delta = c.text[st.chars :]
                    st.chars, st.tokens = len(c.text), len(c.token_ids)
                    if c.finish_reason is not None:
                        st.done, remaining = True, remaining - 1
                    yield self._chunk([choice_body(p * n + c.index, delta, lp, c.finish_reason)])
                if out.finished and out.error is not None:
                    yield f"data: {json.dumps(error_body(out.error, type=SERVER_ERROR))}\n\n"
        if job.include_usage:
            yield self._chunk([], usage_body(sum(prompt_tokens.values()), sum(completion_tokens.values())))
        yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (done, or the client gone)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
