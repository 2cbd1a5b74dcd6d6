"""From a step's native events to what each request's reader sees: text, stops, logprobs, RequestOutputs.

The native scheduler appends tokens and checks end-of-text, stop tokens,
stop strings and lengths itself; it reports an event per sequence that
finished, and per token of a request that reports its tokens (streamed,
served, or with stop patterns), carrying the text bytes no later token can
take back. Everything else about stopping happens here, once: stop patterns
(Python regular expressions) on the text received, and the characters a
pattern may still cut, held back from a running completion's output.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterable, Optional

from .outputs import CompletionOutput, RequestOutput
from .request import Reader, RequestState
from .sampler import Sampled
from .sampling_params import SamplingParams
from .scheduler import FINISH_REASONS, Scheduler
from .stopping import PatternStops

logger = logging.getLogger("fastcodegen")

ERROR = next(k for k, v in FINISH_REASONS.items() if v == "error")


class OutputProcessor:
    """The requests the engine knows, their completions as events build them, and their outputs."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self.requests: dict[int, RequestState] = {}  # by the scheduler's id
        self.by_user_id: dict[str, int] = {}
        self._request_ids = itertools.count()

    def add(
        self,
        prompt: Optional[str],
        ids: list[int],
        params: SamplingParams,
        owner: Reader,
        report_tokens: bool = False,
        request_id: Optional[str] = None,
    ) -> RequestState:
        """Queues a checked request read by `owner`; `report_tokens`: its text reaches Python as it grows."""
        while request_id is None or request_id in self.by_user_id:  # never a live request's id
            request_id = str(next(self._request_ids))
        patterns = PatternStops(params.stop_patterns) if params.stop_patterns else None
        core_id = self._scheduler.add(ids, params, report_tokens=report_tokens or patterns is not None)
        req = RequestState(request_id, core_id, prompt, ids, params, owner, patterns)
        self.requests[core_id] = req
        self.by_user_id[request_id] = core_id
        return req

    def abort(self, req: RequestState) -> None:
        """Ends a request: its unfinished completions end with finish_reason "abort"."""
        if not req.finished:
            self._scheduler.abort(req.core_id)
            req.finished = True
            for c in req.completions.values():
                if c.finish_reason is None:
                    c.finish_reason = "abort"

    def forget(self, req: RequestState) -> None:
        """Drops a request (aborting it first if it runs) once its reader has its last output."""
        self.abort(req)
        req.owner.unread.discard(req.core_id)
        self._scheduler.remove(req.core_id)
        self.requests.pop(req.core_id, None)
        self.by_user_id.pop(req.request_id, None)

    def forget_all(self, requests: Iterable[RequestState]) -> None:
        for req in requests:
            if req.core_id in self.requests:
                self.forget(req)

    def take_news(self, reader: Reader) -> list[RequestOutput]:
        """The outputs of `reader`'s requests that advanced; finished ones are forgotten once read."""
        outs = []
        for core_id in sorted(reader.unread):
            req = self.requests[core_id]
            outs.append(self.output(req))
            if req.finished:
                self.forget(req)
        reader.unread.clear()
        return outs

    # ------------------------------------------------------------------ a step's news

    def process(self, step, sampled: Sampled, events: Iterable[tuple]) -> None:
        """Applies a step's events and logprobs (its prompt rows' first) to the requests; marks their news."""
        if sampled.prompt_logprobs:
            owners, positions = step.arrays["prompt_logits_request"], step.arrays["prompt_logits_position"]
            for r, lp in enumerate(sampled.prompt_logprobs):
                req = self.requests.get(int(owners[r]))
                if lp is not None and req is not None:
                    req.score_prompt(int(positions[r]), lp)
        for seq, core_id, index, _row, finish, new_bytes in events:
            req = self.requests.get(core_id)
            if req is None:
                continue
            c = req.completion(index)
            c.seq = seq
            if new_bytes:
                c.text += new_bytes.decode()
            if finish:
                self._finish(req, c, finish)
            elif req.patterns is not None:
                hit = req.patterns.search(c.text)
                if hit is not None:  # a stop pattern ends the sequence here
                    self._scheduler.stop(seq)
                    c.text, c.finish_reason, c.stop_reason = c.text[: hit[0]], "stop", hit[1]
                    self._count_finished(req)
            req.owner.unread.add(core_id)
        kept = step.arrays["row_kept"]  # a speculating sequence's rows past its last kept token add nothing
        for row, lp in sampled.logprobs.items():
            req = self.requests.get(int(step.sample_request[row]))
            if req is not None and req.error is None and kept[row]:
                req.completion(int(step.sample_index[row])).logprobs.append(lp)

    def _finish(self, req: RequestState, c, finish: int) -> None:
        c.finish_reason = FINISH_REASONS[finish]
        if finish == ERROR:
            if req.error is None:
                req.error = (
                    f"request {req.request_id}: the model produced non-finite logits (NaN or infinity), so no token "
                    "could be drawn; its completions were stopped. Check the weights (a damaged or overflowing "
                    "checkpoint) and the dtype (float16 overflows where bfloat16 does not)"
                )
                logger.error(req.error)
            req.finished = True  # the scheduler ended every sequence of the request
            return
        info = self._scheduler.seq_info(c.seq)
        if info["stop_string"] >= 0:
            c.stop_reason = req.params.stop[info["stop_string"]]
        elif info["stop_token"] >= 0:
            c.stop_reason = info["stop_token"]
        hit = req.patterns.search(c.text) if req.patterns is not None else None
        if hit is not None:  # a pattern matched text that came with the last token
            c.text, c.finish_reason, c.stop_reason = c.text[: hit[0]], "stop", hit[1]
        self._count_finished(req)

    def _count_finished(self, req: RequestState) -> None:
        if sum(c.finish_reason is not None for c in req.completions.values()) == req.params.n:
            req.finished = True

    # ------------------------------------------------------------------ outputs

    def output(self, req: RequestState) -> RequestOutput:
        """The request's RequestOutput now: finished completions whole, running ones as far as they are final."""
        want_lp = req.params.logprobs is not None
        completions = []
        for index in range(req.params.n):
            c = req.completions.get(index)
            if c is None or c.seq < 0:
                if req.finished:  # ended before its prompt forked into n samples: the missing ones are empty
                    completions.append(
                        CompletionOutput(
                            index=index, finish_reason="error" if req.error is not None else "abort",
                            logprobs=[] if want_lp else None, cumulative_logprob=0.0 if want_lp else None,
                        )  # fmt: skip
                    )
                continue
            token_ids = self._scheduler.output_tokens(c.seq) if c.seq >= 0 else []
            text = c.text
            if c.finish_reason is None and req.patterns is not None:
                text = text[: PatternStops.stable_len(text)]
            reason = "error" if req.error is not None else c.finish_reason
            completions.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=token_ids,
                    finish_reason=reason,
                    stop_reason=c.stop_reason if reason is not None else None,
                    logprobs=list(c.logprobs) if want_lp else None,
                    cumulative_logprob=sum(d[t] for d, t in zip(c.logprobs, token_ids)) if want_lp else None,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_token_ids),
            outputs=completions,
            finished=req.finished,
            error=req.error,
            prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
        )
