"""The one thread that drives the engine, and the streams that carry its tokens to requests.

Why one thread: the engine decodes every running request in one batched forward per step
(`fourbit.engine.Engine.step`), so concurrency across HTTP requests comes from batching, not
from threads. The engine is not thread-safe and need not be: every call to it (submit, cancel,
add/remove adapter, step) runs on the scheduler's thread. Request handlers on the asyncio event
loop hand it jobs through a queue; the thread runs all queued jobs, then one step, and so on, so
requests join and leave the batch between steps. When the engine has no work the thread sleeps
on the queue (no polling).

Tokens travel back per request through an asyncio queue on the handler's event loop
(`call_soon_threadsafe`, one call per request per step). Cancelling a stream (client gone,
stop string seen) cancels the engine request at the next step boundary, freeing its batch slot.
If a step raises, every running request ends with that error and the thread keeps serving.

# Note: The engine on the main thread
`fourbit serve` runs this loop on the process's main thread (`run_here`) and the HTTP server on
another. Measured on a 2-core CPU (SmolLM2-135M, 1 request): 34 ms/token when the decode ran on
the thread that loaded the model, 65-68 ms/token on a second thread. Each thread that enters
OpenMP gets its own team; with two teams the process manages more OpenMP threads than there are
cores, and libgomp then stops spin-waiting between parallel regions, so each of the ~500 small
parallel regions of a decode step pays a futex wake-up. One thread doing all the torch work
keeps one team. (`start` keeps the loop on a thread of its own, for tests and embedding.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass

log = logging.getLogger("fourbit.serve")


@dataclass
class _End:
    """The stream is over without a finishing token: cancelled, failed, or the server closing."""

    error: BaseException | None = None


class TokenStream:
    """One submitted generation: iterate it (async) for the engine's TokenEvents of this request."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop, adapter: str | None):
        self.id: int | None = None  # the engine's request id, set on the engine thread
        self.adapter = adapter
        self.done = False  # set on the engine thread when the request left the engine
        self._scheduler = scheduler
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending: list = []

    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self._pending:
            item = await self._queue.get()
            if isinstance(item, _End):
                self._queue.put_nowait(item)  # later calls end too
                if item.error is not None:
                    raise item.error
                raise StopAsyncIteration
            self._pending = list(item)
        event = self._pending.pop(0)
        if event.finished:
            self._queue.put_nowait(_End())
        return event

    def cancel(self) -> None:
        """Stop generating (idempotent): the batch slot is free after the current step."""
        self._scheduler._cancel(self)

    def _deliver(self, item) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the handler's loop is closed: nobody is listening any more
            pass


class Scheduler:
    """Owns the engine and its thread. `start()` once, `close()` at shutdown."""

    def __init__(self, engine):
        self.engine = engine
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, TokenStream] = {}  # engine request id -> stream (engine thread only)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fourbit-engine", daemon=True)
        self.steps = 0  # batched forwards so far
        self.widest_step = 0  # most requests that got a token from one step so far

    # -- called from any thread ---------------------------------------------------------------
    def start(self) -> Scheduler:
        """Run the loop on a thread of its own."""
        self._thread.start()
        return self

    def run_here(self) -> None:
        """Run the loop on the calling thread until `close()` (from another thread) or Ctrl-C; see
        Note: The engine on the main thread."""
        if self._thread.is_alive():
            raise RuntimeError("the scheduler already runs on its own thread")
        try:
            self._run()
        except KeyboardInterrupt:
            self._closing = True
            for stream in list(self._streams.values()):
                self._finish(stream, _End(RuntimeError("the server is shutting down")))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; running streams end with an error."""
        self._closing = True
        self._jobs.put((lambda engine: None, None))  # wake it
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        """Requests submitted and not yet finished (decoding or waiting for a batch slot)."""
        return len(self._streams)

    def call(self, fn) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between two steps; its result or exception in the future."""
        if self._closing:
            raise RuntimeError("the scheduler is closed")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut

    async def submit(self, prompt_ids: list[int], adapter: str | None = None, **sampling) -> TokenStream:
        """Queue a request; the stream yields its TokenEvents. Raises the engine's UserError for bad input."""
        stream = TokenStream(self, asyncio.get_running_loop(), adapter)

        def submit(engine):
            stream.id = engine.submit(list(prompt_ids), adapter=adapter, **sampling)
            self._streams[stream.id] = stream
            return stream

        return await asyncio.wrap_future(self.call(submit))

    # -- engine thread ------------------------------------------------------------------------
    def _cancel(self, stream: TokenStream) -> None:
        if stream.done or self._closing:
            return

        def cancel(engine):
            if stream.id is not None and self._streams.get(stream.id) is stream:
                self._finish(stream, _End(), cancel=True)

        self._jobs.put((cancel, None))

    def _finish(self, stream: TokenStream, end: _End | None, cancel: bool = False) -> None:
        self._streams.pop(stream.id, None)
        stream.done = True
        if cancel:
            try:
                self.engine.cancel(stream.id)
            except Exception:  # noqa: BLE001 - the engine had already dropped it
                log.debug("engine.cancel(%s) failed", stream.id, exc_info=True)
        if end is not None:
            stream._deliver(end)

    def _run(self) -> None:
        while not self._closing:
            self._run_jobs(block=not self.engine.has_work())
            if self._closing:
                break
            if self.engine.has_work():
                self._step()
        for stream in list(self._streams.values()):
            self._finish(stream, _End(RuntimeError("the server is shutting down")))

    def _run_jobs(self, block: bool) -> None:
        try:
            job = self._jobs.get(timeout=1.0) if block else self._jobs.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut = job
            if fut is None or fut.set_running_or_notify_cancel():
                try:
                    result = fn(self.engine)
                except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                    if fut is None:
                        log.exception("engine job failed")
                    else:
                        fut.set_exception(e)
                else:
                    if fut is not None:
                        fut.set_result(result)
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        running = len(self._streams)
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
            log.exception("engine step failed; ending the %d running request(s)", running)
            for stream in list(self._streams.values()):
                self._finish(stream, _End(RuntimeError(f"generation failed: {type(e).__name__}: {e}")), cancel=True)
            return
        self.steps += 1
        by_stream: dict[int, list] = {}
        for ev in events:
            if ev.request_id in self._streams:
                by_stream.setdefault(ev.request_id, []).append(ev)
        self.widest_step = max(self.widest_step, len({ev.request_id for ev in events}))
        for rid, evs in by_stream.items():
            stream = self._streams[rid]
            if any(ev.finished for ev in evs):
                self._finish(stream, None)  # before delivering: a client that saw its end sees it counted
            stream._deliver(evs)
