"""The child's side of taking turns: stop at a gate until the benchmark says go. A gate is a pair
of pipe descriptors (``ready`` written by the child, ``go`` read by it) passed to the child."""

from __future__ import annotations

import os
import time


class Gate:
    def __init__(self, ready: int, go: int):
        self.ready, self.go = ready, go
        self.waits: list[float] = []  # seconds spent at each gate

    def wait(self) -> None:
        t = time.perf_counter()
        os.write(self.ready, b"r")
        if os.read(self.go, 1) != b"g":
            raise SystemExit("the benchmark stopped")
        self.waits.append(time.perf_counter() - t)
