"""Independent CPU work items over Python threads, one torch thread each.

On CPU, many mid-sized torch ops in one call scale worse over intra-op threads than independent
items each on one thread (every parallel region waits for its helper threads, which on a busy
machine costs milliseconds); so ``parallel_map`` runs the items on as many Python threads as torch
had intra-op threads, with torch's intra-op threads set to 1 until the last concurrent call
returns. Results do not depend on the thread count.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_users = 0
_saved = 1


def parallel_map(work: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[work(item) for item in items]``, the items spread over Python threads."""
    global _users, _saved
    items = list(items)
    if len(items) <= 1:
        return [work(item) for item in items]
    with _lock:
        if _users == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _users += 1
        workers = min(_saved, len(items))
    try:
        if workers == 1:
            return [work(item) for item in items]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(work, items))
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                torch.set_num_threads(_saved)
