"""AsyncLLM: the engine's step loop in its own thread, requests in through a bounded queue, tokens out
as an async stream per request. The event loop never runs a forward.

The engine is BUILT on that thread too (`AsyncLLM.from_config`): GNU OpenMP keeps one worker team per
thread that ever ran a parallel region, and once there are more such threads than cores it stops
spinning between regions (its throttled spin count) -- every parallel region then waits ~40 us for a
futex wake-up. A model loaded on the main thread and stepped on another made the bundled target's batch-1
step 5.4x slower on a 2-core machine (1.68 vs 0.31 ms; benchmarks/serve_overhead.py measures it).

    async for out in llm.generate(prompt, params, request_id):   # RequestOutput per step (n > 1: per choice)
        ...
Cancelling the consumer (a client that disconnects) aborts the request: its blocks are free by the next step.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from typing import Callable

from afford.config import ConfigError, EngineConfig, LossyConfig, SpeculativeConfig
from afford.core.outputs import RequestOutput
from afford.core.params import SamplingParams
from afford.engine import Engine


class QueueFull(RuntimeError):
    """More requests are waiting or running than max_queue allows; retry later."""


class EngineDead(RuntimeError):
    pass


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop, self.q = loop, asyncio.Queue()
        self.open_choices = n        # counted down by the engine thread
        self.seen = 0                # finished choices the consumer has read

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, item)


class AsyncLLM:
    def __init__(self, engine: Engine | Callable[[], Engine], max_queue: int = 256):
        """`engine`: an Engine, or a function that builds one -- called on the engine thread, so that every
        torch parallel region runs on one thread's OpenMP team (see the module's docstring); its
        exception, if any, is raised here."""
        self.max_queue = max_queue
        self.cmds: queue.Queue = queue.Queue()
        self.streams: dict[str, _Stream] = {}
        self.in_flight = 0                      # requests accepted and not yet finished
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.step_errors = 0
        built = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                self.engine = engine() if callable(engine) else engine
            except BaseException as e:           # raised to the caller below
                failed.append(e)
                return
            finally:
                built.set()
            self._loop()

        self.thread = threading.Thread(target=run, name="afford-engine", daemon=True)
        self.thread.start()
        built.wait()
        if failed:
            self.thread.join()
            raise failed[0]

    @staticmethod
    def from_config(cfg: EngineConfig, speculative: SpeculativeConfig | None = None, max_queue: int = 256,
                    lossy: LossyConfig | None = None) -> "AsyncLLM":
        return AsyncLLM(lambda: Engine(cfg, speculative, lossy), max_queue)

    # ---- the engine thread ----
    def _loop(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._drain(block=not eng.has_unfinished())
            if not eng.has_unfinished():
                continue
            try:
                outs = eng.step()
            except Exception as e:           # a failed forward fails the requests of that batch, not the loop
                self.step_errors += 1
                traceback.print_exc()
                # an engine that can run no forward any more (an AFD worker died) fails every request it holds
                held = list(eng.seqs.values()) if eng.broken is not None else list(eng.scheduler.running)
                for rid in dict.fromkeys(s.request_id for s in held):
                    self._fail(rid, e)
                continue
            for out in outs:
                self._deliver(out)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self.cmds.get(timeout=0.05) if block else self.cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, rid, *args = cmd
            if kind == "add":
                try:
                    self.engine.add_request(args[0], args[1], rid)
                except Exception as e:
                    self._fail(rid, e)
            elif kind == "abort":
                self.engine.abort(rid)
                stream = self.streams.get(rid)
                if stream is not None:
                    stream.put(EngineDead("the request was aborted"))
                self._close(rid)
            try:
                cmd = self.cmds.get_nowait()
            except queue.Empty:
                return

    def _group(self, request_id: str) -> str:
        return request_id.split("/", 1)[0]

    def _deliver(self, out: RequestOutput) -> None:
        if out.error is not None:                # this request failed alone: its choices end, the rest go on
            self._fail(out.request_id, out.error)
            return
        stream = self.streams.get(self._group(out.request_id))
        if stream is None:
            return
        stream.put(out)
        if out.finished:
            stream.open_choices -= 1
            if stream.open_choices == 0:
                self._close(self._group(out.request_id))

    def _fail(self, rid: str, err: Exception) -> None:
        group = self._group(rid)
        self.engine.abort(group)
        stream = self.streams.get(group)
        if stream is not None:
            stream.put(err)
            self._close(group)

    def _close(self, group: str) -> None:
        with self._lock:
            if self.streams.pop(group, None) is not None:
                self.in_flight -= 1

    # ---- the event-loop side ----
    def submit(self, prompt, params: SamplingParams, request_id: str) -> _Stream:
        """Admit a request (raises QueueFull or EngineDead at once, before any response is started)."""
        if self._stop.is_set() or not self.thread.is_alive():
            raise EngineDead("the engine is shutting down")
        if self.engine.broken is not None:
            raise EngineDead(f"the engine cannot serve: {self.engine.broken}")
        with self._lock:
            if self.in_flight >= self.max_queue:
                raise QueueFull(f"{self.in_flight} requests in flight (max_queue={self.max_queue}); retry later")
            if request_id in self.streams:
                raise ConfigError(f"request id {request_id!r} is in use")
            self.in_flight += 1
            stream = self.streams[request_id] = _Stream(asyncio.get_running_loop(), params.n)
        self.cmds.put(("add", request_id, prompt, params))
        return stream

    async def generate(self, prompt, params: SamplingParams, request_id: str):
        """Submit, then yield every RequestOutput of the request's n choices until all have finished."""
        stream = self.submit(prompt, params, request_id)
        async for out in self.outputs(stream, params.n, request_id):
            yield out

    async def outputs(self, stream: _Stream, n: int, request_id: str):
        finished = False
        try:
            while True:
                item = await stream.q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    stream.seen += 1
                    if stream.seen == n:
                        finished = True
                        return
        finally:
            if not finished:                 # the consumer went away (client disconnect, error): free its blocks
                self.cmds.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self.cmds.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Let in-flight requests finish for up to `timeout` seconds, then abort the rest and stop."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        for rid in list(self.streams):
            self.cmds.put(("abort", rid))
        time.sleep(0.1)
        self._stop.set()
        self.thread.join(timeout=5)
        self.engine.close()


__all__ = ["AsyncLLM", "QueueFull", "EngineDead", "ConfigError"]
