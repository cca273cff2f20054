"""Thread limits for the small numerical solves of the evaluation (probe and few-shot fits).

A logistic regression on a few thousand feature vectors does about a millisecond of work per iteration. With
several BLAS/OpenMP thread pools in one process (torch's and scikit-learn's), each iteration then pays thread
start-up and barrier costs that can exceed the work itself, and on a busy machine a preempted worker stalls
every barrier: we measured a 463-iteration sklearn fit take 30 s with 2 threads and 0.7 s with 1. Small solves
therefore run single-threaded; large ones keep the default thread pools.
"""

from __future__ import annotations

import contextlib

from threadpoolctl import threadpool_limits

SINGLE_THREAD_WORK = 2e8  # multiply-adds per solver iteration below which one thread is faster


def solver_threads(work_per_iteration: float):
    """A context manager: one thread for a small problem (`work_per_iteration` multiply-adds), else no change."""
    if work_per_iteration < SINGLE_THREAD_WORK:
        return threadpool_limits(limits=1)
    return contextlib.nullcontext()
