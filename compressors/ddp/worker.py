"""The communication thread of an overlapping DDP hook: one per hook state, jobs run in submission order.

DDP calls its hook for bucket 0, 1, 2, ... in index order on every rank as soon as each bucket's gradients
are ready, while the backward pass goes on computing the next buckets. The hook only submits the bucket's
job here and returns the job's future; this one thread runs the jobs first in, first out. Since every rank
submits in DDP's bucket order and a single thread per process issues every collective, all ranks issue the
same collectives in the same order, and a bucket's communication overlaps the backward pass of the later
ones. (torch's ``powerSGD_hook`` issues collectives from future callbacks, whose order differs per rank on
gloo with several buckets.)

The thread is a daemon (it never holds the interpreter open at exit); ``close()`` ends it explicitly after
the jobs already submitted, a garbage-collected owner closes it too (see ``HookState``), and an exit
handler closes every thread still running before the interpreter finalizes.
"""
from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable

import torch

_STOP = object()
_LIVE: weakref.WeakSet = weakref.WeakSet()  # workers with a thread, stopped at exit (see _close_all)
#: seconds the exit handler waits for each thread (one stuck in a collective with a dead peer is left behind)
EXIT_WAIT_S = 5.0


@atexit.register
def _close_all() -> None:
    """Stop every thread before the interpreter finalizes: a daemon thread that has run torch code and is
    still alive when torch's static state is torn down can abort the process ("terminate called ...")."""
    for worker in list(_LIVE):
        worker.close(EXIT_WAIT_S)


class HookWorker:
    """Runs ``job()`` for every ``submit(job, future)`` on one daemon thread and completes ``future``:
    ``set_result(job())``, or ``set_exception(error)`` if the job raised (DDP then raises it from backward)."""

    def __init__(self, name: str = "ddp-hook-comm"):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], torch.Tensor], future: torch.futures.Future) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"HookWorker {self.name!r} is closed: the hook state was closed; build a new "
                                   "one with compressors.ddp_comm_hook")
            if self._thread is None:  # started on first use: the process group exists by then
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
                _LIVE.add(self)
            self._jobs.put((job, future))

    def close(self, timeout: float | None = 60.0) -> None:
        """Finish the jobs already submitted, then stop the thread (idempotent). ``timeout``: seconds to wait."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._jobs.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job, future = item
            try:
                with torch.no_grad():
                    result = job()
            except Exception as error:  # reaches the future: DDP raises it where it waits for the bucket
                future.set_exception(error)
                continue
            future.set_result(result)
