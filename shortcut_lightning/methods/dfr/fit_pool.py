"""``FitPool``: the independent fits of a last-layer method (DFR's C tuning and balanced refits, AFR's grid) on
every core, deterministically.

liblinear shuffles its coordinates with the C library's global ``rand()``, seeded per fit. Fits in threads
therefore draw from one another's sequence, and the heads depend on thread timing. Forked processes each own
their ``rand()``: a fit in a worker gives exactly the fit of one process, and the pool gives what a loop gives.
Small L-BFGS fits (AFR) are mostly Python overhead under the GIL, so they too gain from processes only.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

# a task: (fit, index of an array tuple in the pool); the fit is called on that tuple's arrays
Task = tuple[Callable[..., Any], int]

_worker_arrays: Sequence[tuple[Any, ...]] = ()  # a forked worker's copy of the pool's arrays


def _share(arrays: Sequence[tuple[Any, ...]]) -> None:
    global _worker_arrays
    _worker_arrays = arrays
    if "torch" in sys.modules:  # one core per worker: torch's own threads would only contend
        sys.modules["torch"].set_num_threads(1)


def _run(task: Task) -> Any:
    fit, which = task
    return fit(*_worker_arrays[which])


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def can_fork() -> bool:
    """Forked workers only where fork is safe and cheap (Linux): elsewhere the fits run in a loop."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class FitPool:
    """Runs fits over shared arrays in ``workers`` forked processes (a loop when ``workers`` is 1).

    The arrays reach the workers by fork, not by pickling; a task sends only its fit (a picklable callable,
    e.g. a ``functools.partial`` of a module-level function holding its rows) and which arrays it takes.

    Example::

        with FitPool([(x, y)], workers=2) as pool:
            fits = pool.map([(partial(fit_rows, rows), 0) for rows in subsamples])
    """

    def __init__(self, arrays: Sequence[tuple[Any, ...]], workers: int | None) -> None:
        self.arrays = list(arrays)
        wanted = available_cores() if workers is None else workers  # None: every core this process may use
        self.workers = max(1, wanted) if can_fork() else 1
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> FitPool:
        if self.workers > 1:
            context = multiprocessing.get_context("fork")
            with (
                warnings.catch_warnings()
            ):  # Python warns about fork in a threaded process; workers run numpy only
                warnings.simplefilter("ignore", DeprecationWarning)
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=context, initializer=_share, initargs=(self.arrays,)
                )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, tasks: Sequence[Task]) -> list[Any]:
        """The fits of ``tasks``, in order."""
        if self._pool is None or len(tasks) < 2:
            return [fit(*self.arrays[which]) for fit, which in tasks]
        chunk = -(-len(tasks) // self.workers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return list(self._pool.map(_run, tasks, chunksize=chunk))
