"""Collating the next batches on a background thread while the device computes (CUDA runs; on a CPU the thread
would compete with torch's compute threads for the cores, and the loop collates inline).

The loop then finds each batch ready: padding, tensor building and pinning overlap the forward and backward, which
release the GIL. Batches come out in the loader's order, and the loop counts what it took, not
what was collated ahead, so a resumed run starts exactly where the checkpoint says.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def ahead(batches: Iterable[dict[str, Any]], depth: int = 2, pin: bool = False) -> Iterator[dict[str, Any]]:
    """`batches`, produced up to `depth` ahead on a daemon thread; `pin`: page-locked host tensors (CUDA), so the
    loop's non_blocking copies really overlap. An error in the producer is raised here, at the batch it concerns.
    Closing this generator (or dropping it) stops the thread."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if pin:
                    batch = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in batch.items()}
                if not offer(batch):
                    return
            offer(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            offer(_Failed(e))

    # a daemon, so that a loop left by an exception never holds the interpreter open; a loop that finishes closes
    # this generator, and the thread is joined here (it notices `stop` within 0.1 s), before the process exits
    producer = threading.Thread(target=produce, name="ftune-collate", daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        producer.join()
