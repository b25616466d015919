"""Dynamic batching across concurrent requests.

Usage::

    batcher = Batcher(model.predict, max_batch=32, max_wait_ms=5, executor=model_thread)
    await batcher.start()                                 # inside the running event loop
    probs = await batcher.submit([img0, img1])            # one (K,) row per image, in order
    await batcher.stop()

Images of all requests go into one asyncio queue. A collector task takes the first waiting image,
then every image already queued and whatever arrives until ``max_batch`` images are together or
``max_wait_ms`` have passed since the first of them was queued; then one model call runs on the
stacked batch in ``executor`` (one thread: the model runs one batch at a time, with all the
engine's intra-op threads). While it runs, new images queue up and form the next batch, so under
load batches fill up without waiting. ``max_batch=1`` turns batching off (one call per image).
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import Executor
from typing import Callable

import numpy as np
import torch


class Batcher:
    """Collect images from concurrent callers into batches for one ``fn(uint8 (N, C, S, S)) -> (N, K)``."""

    def __init__(self, fn: Callable[[torch.Tensor], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0,
                 executor: Executor | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.executor = executor
        self.calls = 0            # model calls made
        self.images = 0           # images predicted
        self.sizes: collections.Counter = collections.Counter()  # batch size -> how many calls
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="medxfer-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def stats(self) -> dict:
        return {"calls": self.calls, "images": self.images, "max_batch": self.max_batch,
                "mean_batch": self.images / self.calls if self.calls else 0.0,
                "sizes": dict(sorted(self.sizes.items()))}

    async def submit(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """Probabilities for each image (uint8 (C, S, S)), in order; raises what the model raised."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not awaited")
        loop = asyncio.get_running_loop()
        futures = []
        now = time.monotonic()
        for img in images:
            fut = loop.create_future()
            self._queue.put_nowait((img, fut, now))
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    def _call(self, images: list[torch.Tensor]) -> np.ndarray:
        # in the executor: torch calls on the event loop release and re-take the GIL, and each re-take
        # can wait for a decoding thread's switch interval (0.3 ms per request measured for unbind)
        return self.fn(torch.stack(images))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            first = await queue.get()
            batch = [first]
            deadline = first[2] + self.max_wait
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except (asyncio.TimeoutError, TimeoutError):
                    break
            live = [b for b in batch if not b[1].done()]  # callers that went away are dropped
            if not live:
                continue
            try:
                probs = await loop.run_in_executor(self.executor, self._call, [b[0] for b in live])
            except asyncio.CancelledError:
                for _, fut, _ in live:
                    if not fut.done():
                        fut.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - handed to every caller of this batch
                for _, fut, _ in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.calls += 1
            self.images += len(live)
            self.sizes[len(live)] += 1
            for (_, fut, _), row in zip(live, probs):
                if not fut.done():
                    fut.set_result(row)
