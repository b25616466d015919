"""A memory budget for requests in flight: upload bytes and decoded pixels, first come first served.

Usage::

    budget = MemoryBudget(limit=1024 * 2**20, wait=10.0)
    async with budget.hold(cost):          # waits its turn; ApiError 503 (Retry-After) after ``wait`` s
        ...decode...                       # ApiError 413 at once when ``cost`` alone is above ``limit``

A 200 kB PNG can claim 8000 x 8000 RGB pixels: about 250 MB once decoded. Without a bound, a few
such uploads at once exhaust the machine's memory; with it, they queue (in arrival order, so that a
large request is not starved by small ones) and a request that cannot start within ``wait`` seconds
gets ``503 Service Unavailable`` with ``Retry-After``, never an out-of-memory kill.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math

from medxfer.serve.errors import ApiError


class MemoryBudget:
    """At most ``limit`` bytes held at once by :meth:`hold`; a waiter gives up after ``wait`` seconds."""

    def __init__(self, limit: int, wait: float):
        if limit < 1 or wait < 0:
            raise ValueError(f"limit must be >= 1 and wait >= 0, got {limit}, {wait}")
        self.limit = int(limit)
        self.wait = float(wait)
        self.used = 0
        self.peak = 0
        self.refused = 0
        self._waiters: collections.deque = collections.deque()  # (bytes, future), in arrival order

    @contextlib.asynccontextmanager
    async def hold(self, cost: int):
        cost = max(0, int(cost))
        if cost > self.limit:
            raise ApiError(413, "too_large_to_decode",
                           f"decoding this request needs about {math.ceil(cost / 2**20)} MB, above the server's "
                           f"memory budget of {self.limit // 2**20} MB (--max-inflight-mb); send fewer or smaller "
                           "images")
        await self._acquire(cost)
        try:
            yield
        finally:
            self._release(cost)

    async def _acquire(self, cost: int) -> None:
        if not self._waiters and self.used + cost <= self.limit:
            self._take(cost)
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (cost, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.wait):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():  # granted just as the wait ended: give it back
                self._release(cost)
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()  # a large waiter leaving the head may let the next ones in
            if isinstance(e, TimeoutError):
                self.refused += 1
                retry = max(1, math.ceil(self.wait))
                raise ApiError(503, "busy", f"the server is decoding other images (memory budget of "
                               f"{self.limit // 2**20} MB in use); retry in {retry} s",
                               headers={"Retry-After": str(retry)}) from None
            raise

    def _take(self, cost: int) -> None:
        self.used += cost
        self.peak = max(self.peak, self.used)

    def _release(self, cost: int) -> None:
        self.used -= cost
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            cost, fut = self._waiters.popleft()
            if not fut.done():
                self._take(cost)
                fut.set_result(None)
