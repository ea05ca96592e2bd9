"""One whole ``lota adapt`` run, in process, cut into memory segments by ``lota.events``: a child
of the memory benchmark's pipeline and checkpointing parts.

The high-water mark of the resident set starts once the model is loaded (its weights read, so
that pages mapped from the file are resident). A segment ends at each phase start, just before
lota restarts the mark, and at each phase end; each is recorded with its label (``setup``, the
phase, ``after PHASE``), its peak and its seconds. Prints one JSON line: the CLI's exit code, the
run's seconds, the resident set once the model was loaded, and the segments.

    python -m bench.memory.segments LOTA-ARGUMENTS...   (``--quiet adapt MODEL ...``)
"""

from __future__ import annotations

import json
import sys
import time

import torch

from lota import cli, events
from lota.train import current_peak_rss_mb, current_rss_mb, reset_peak_rss


class Segments:
    def __init__(self):
        self.rows: list[list] = []
        self.label: str | None = None
        self.t = 0.0
        self.loaded_mb: float | None = None

    def close(self, label: str | None) -> None:
        """End the running segment at its high-water mark, then start ``label`` afresh."""
        if self.label is not None:
            self.rows.append([self.label, current_peak_rss_mb(), time.perf_counter() - self.t])
        reset_peak_rss()
        self.label, self.t = label, time.perf_counter()

    def __call__(self, e: events.Event) -> None:
        if e.kind == "model_loaded" and self.loaded_mb is None:
            with torch.no_grad():  # weights mapped from their file count once read: read them now
                for t in [*e.data["model"].parameters(), *e.data["model"].buffers()]:
                    t.sum()
            self.loaded_mb = current_rss_mb() or 0.0
            self.close("setup")
        elif e.kind == "phase_start" and self.label is not None:
            self.close(e.phase)  # lota restarts the mark next: the segment up to here is recorded
        elif e.kind == "phase_end" and self.label is not None:
            self.close("after " + e.phase)


def main(argv: list[str]) -> dict:
    seg = Segments()
    t = time.perf_counter()
    with events.subscribe(seg):
        code = cli.main(argv)
    seconds = time.perf_counter() - t
    seg.close(None)
    return {"code": code, "seconds": seconds, "loaded_mb": seg.loaded_mb, "segments": seg.rows}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
