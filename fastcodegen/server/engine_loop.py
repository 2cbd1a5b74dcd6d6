"""The one thread that steps the engine for the server, and the handoff between it and the asyncio event loop.

Handlers on the event loop never take the engine's lock (a step holds it):
they hand a `Submission` (an HTTP request's prompts and SamplingParams) to
the engine thread and await its outcome. Between two steps the thread adds
what was submitted, aborts what was cancelled (a client that went away: its
KV blocks are free before the next step), runs a step, and posts each
submission's news to its own `Mailbox` with `call_soon_threadsafe`. With
nothing to do it sleeps on a condition variable.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Union

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..scheduler import SchedulerStats
from .protocol import Prompt

logger = logging.getLogger("fastcodegen.server")


class Overloaded(Exception):
    """More requests wait for the engine than the server lets queue (`max_waiting`)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


class PromptRejected(Exception):
    """The engine refused one of a submission's prompts; none of them runs."""

    def __init__(self, prompt_index: int, error: ValueError):
        super().__init__(str(error))
        self.prompt_index = prompt_index
        self.error = error


@dataclass(frozen=True)
class StepNews:
    """The outputs one step made for a submission: (prompt index, RequestOutput), and when they came."""

    time: float  # time.monotonic()
    outputs: list[tuple[int, RequestOutput]]


@dataclass(frozen=True)
class Ended:
    """A submission ended from outside before its requests finished: the server stopping, or a failed step."""

    reason: str  # "shutdown" or "error"
    message: str


News = Union[StepNews, Ended]


class Mailbox:
    """A submission's news, as its handler reads them: the latest output of each prompt, then the end.

    Outputs are snapshots (a completion's text, tokens and logprobs so far),
    so a reader that falls behind gets the newest one per prompt instead of
    a backlog: memory stays one output per prompt however slow the client.
    Lives on the event loop; the engine thread posts with call_soon_threadsafe.
    """

    def __init__(self) -> None:
        self._latest: dict[int, RequestOutput] = {}
        self._time = 0.0
        self._ended: Optional[Ended] = None
        self._ready = asyncio.Event()

    def post(self, news: News) -> None:
        if isinstance(news, Ended):
            self._ended = news
        else:
            self._latest.update(news.outputs)
            self._time = news.time
        self._ready.set()

    async def get(self) -> News:
        """The outputs that came since the last call (by prompt index), else the end; waits for either."""
        while True:
            if self._latest:
                latest, self._latest = self._latest, {}
                return StepNews(self._time, sorted(latest.items()))
            if self._ended is not None:
                return self._ended
            self._ready.clear()
            await self._ready.wait()


@dataclass(eq=False)
class Submission:
    """One HTTP request's engine requests (one per prompt), as the engine thread and the handler share them."""

    prompts: list[Prompt]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    news: Mailbox
    added: asyncio.Future  # done once the engine took every prompt (or refused one)
    request_ids: list[str] = field(default_factory=list)
    cancelled: bool = False  # set under the handoff lock


class EngineLoop:
    """Steps an engine on a thread of its own for the requests an asyncio server submits.

    `start()` from the event loop's side before submitting; `stop()` ends
    every request still running (their streams get `Ended("shutdown")`) and
    joins the thread.
    """

    def __init__(self, engine, max_waiting: int):
        self.engine = engine
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._inbox: list[Submission] = []  # submitted, not yet added to the engine
        self._adding = 0  # prompts the engine thread took from the inbox and the stats snapshot does not show yet
        self._cancelled: list[Submission] = []
        self._accepting = False
        self._stopping = False
        self.thread: Optional[threading.Thread] = None  # the engine thread, once started
        self._live: dict[str, tuple[Submission, int]] = {}  # engine request id -> (submission, prompt index)
        self.stats: SchedulerStats = engine.stats  # refreshed by the engine thread after every round
        self.failed: Optional[str] = None  # why the thread died, if it did

    # ------------------------------------------------------------------ the event loop's side

    def start(self) -> None:
        """Starts the engine thread; submissions are taken from now on."""
        with self._cond:
            if self.thread is not None:
                raise RuntimeError("this EngineLoop was already started")
            self._accepting = True
            self.thread = threading.Thread(target=self._run, name="fastcodegen-engine", daemon=True)
            self.thread.start()

    @property
    def running(self) -> bool:
        """Whether requests are taken: started, not stopping, and the engine thread alive."""
        return self._accepting and self.thread is not None and self.thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests waiting for the engine: submitted but not yet added, and added but not yet scheduled."""
        with self._cond:
            return self._num_waiting()

    def _num_waiting(self) -> int:
        return self.stats.num_waiting + self._adding + sum(len(s.prompts) for s in self._inbox)

    async def submit(self, prompts: list[Prompt], params: SamplingParams) -> Submission:
        """Hands prompts to the engine; returns once every one is queued there.

        Raises Overloaded or ShuttingDown (nothing queued), or PromptRejected
        (the engine refused a prompt; none of them runs).
        """
        loop = asyncio.get_running_loop()
        sub = Submission(prompts, params, loop, Mailbox(), loop.create_future())
        stem = uuid.uuid4().hex
        sub.request_ids = [f"{stem}-{i}" for i in range(len(prompts))]
        with self._cond:
            if not self.running:
                raise ShuttingDown(
                    f"the engine failed: {self.failed}" if self.failed else "the server is shutting down"
                )
            waiting = self._num_waiting()
            if waiting + len(prompts) > self.max_waiting:
                raise Overloaded(
                    f"the server is overloaded: {waiting} requests wait for the engine (at most {self.max_waiting})"
                )
            self._inbox.append(sub)
            self._cond.notify()
        try:
            await sub.added
        except BaseException:
            self.cancel(sub)
            raise
        return sub

    def cancel(self, sub: Submission) -> None:
        """Aborts a submission's requests that still run (before the next step); idempotent, from any thread."""
        with self._cond:
            if sub.cancelled:
                return
            sub.cancelled = True
            self._cancelled.append(sub)
            self._cond.notify()

    def begin_stop(self) -> None:
        """Takes no more submissions and ends those under way; returns at once (see `stop`)."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Ends every request under way, then joins the engine thread."""
        self.begin_stop()
        if self.thread is not None:
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            device = self.engine.config.device
            if device.type == "cuda":  # the current device is per thread, and Triton launches on it
                import torch

                torch.cuda.set_device(device)
            while self._round():
                pass
        except BaseException as e:  # the engine is unusable: nothing more can run
            self.failed = f"{type(e).__name__}: {e}"
            logger.exception("the engine loop stopped")
            with self._cond:
                self._accepting = False
                inbox, self._inbox = self._inbox, []
            for sub in inbox:
                self._resolve(sub, ShuttingDown(f"the engine failed: {self.failed}"))
            self._end_all(Ended("error", f"the engine failed: {self.failed}"))

    def _round(self) -> bool:
        """Adds, aborts, one step, news; False once stopped."""
        engine = self.engine
        with self._cond:
            while not (self._inbox or self._cancelled or self._stopping or engine.has_unfinished_requests()):
                self._cond.wait()
            inbox, self._inbox = self._inbox, []
            cancelled, self._cancelled = self._cancelled, []
            stopping = self._stopping
            self._adding = sum(len(s.prompts) for s in inbox)
        # Adds before aborts: a submission cancelled while it waited in the inbox is skipped, and one cancelled
        # after this round took it is aborted in the next round.
        for sub in inbox:
            if stopping:
                self._resolve(sub, ShuttingDown("the server is shutting down"))
            elif not sub.cancelled:
                self._add(sub)
        for sub in cancelled:
            self._abort(sub)
        if stopping:
            self._end_all(Ended("shutdown", "the server is shutting down"))
            self._refresh_stats()
            return False
        self._refresh_stats()
        if engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as e:  # a failed step fails what ran in it; the server goes on
                logger.exception("an engine step failed")
                self._end_all(Ended("error", f"the engine step failed: {type(e).__name__}: {e}"))
                outputs = []
            self._refresh_stats()  # first: a client that reads its news then /metrics sees the step's state
            self._post_news(outputs)
        return True

    def _refresh_stats(self) -> None:
        # Under the handoff lock, so that a submission never sees the requests just added counted twice, or not
        # at all, while it decides whether too many wait.
        with self._cond:
            self.stats = self.engine.stats
            self._adding = 0

    def _add(self, sub: Submission) -> None:
        added = []
        try:
            for i, prompt in enumerate(sub.prompts):
                self.engine.add_request(
                    prompt.text, sub.params, prompt_token_ids=prompt.token_ids, request_id=sub.request_ids[i]
                )
                added.append(sub.request_ids[i])
        except Exception as e:  # a ValueError names what is wrong with the prompt; anything else is internal
            for rid in added:
                self.engine.abort(rid)
            self._resolve(sub, PromptRejected(len(added), e) if isinstance(e, ValueError) else e)
            return
        for i, rid in enumerate(added):
            self._live[rid] = (sub, i)
        self._resolve(sub, None)

    def _abort(self, sub: Submission) -> None:
        for rid in sub.request_ids:
            if self._live.pop(rid, None) is not None:
                self.engine.abort(rid)

    def _end_all(self, ended: Ended) -> None:
        """Aborts every live request; each submission gets `ended` once."""
        subs = {sub for sub, _ in self._live.values()}
        for rid in list(self._live):
            try:
                self.engine.abort(rid)
            except Exception:  # a closed or broken engine: nothing left to free
                pass
        self._live.clear()
        for sub in subs:
            self._post(sub, ended)

    def _post_news(self, outputs: list[RequestOutput]) -> None:
        news: dict[Submission, list[tuple[int, RequestOutput]]] = defaultdict(list)
        for out in outputs:
            entry = self._live.get(out.request_id)
            if entry is None:  # cancelled meanwhile
                continue
            sub, index = entry
            news[sub].append((index, out))
            if out.finished:
                del self._live[out.request_id]
        now = time.monotonic()
        for sub, items in news.items():
            self._post(sub, StepNews(now, items))

    @staticmethod
    def _post(sub: Submission, item: News) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.news.post, item)
        except RuntimeError:  # the event loop is closed: nobody reads this anymore
            pass

    @staticmethod
    def _resolve(sub: Submission, error: Optional[BaseException]) -> None:
        def resolve() -> None:
            if sub.added.done():  # the handler was cancelled meanwhile
                return
            if error is None:
                sub.added.set_result(None)
            else:
                sub.added.set_exception(error)

        try:
            sub.loop.call_soon_threadsafe(resolve)
        except RuntimeError:
            pass
