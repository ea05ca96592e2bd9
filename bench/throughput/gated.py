"""``lota adapt`` in process, stopping at a gate when its training phase is about to run its steps
and after each of its steps (its checkpoint written), until the benchmark lets it go on: a child
of the throughput benchmark. It follows the run's ``lota.events`` (``phase_start``,
``step_end``). Prints the seconds spent at each gate as one JSON line, and exits with the CLI's
code.

    python -m bench.throughput.gated READY_FD GO_FD LOTA-ARGUMENTS...
"""

from __future__ import annotations

import json
import sys

from lota import cli, events

from .gate import Gate


def main(argv: list[str]) -> int:
    gate = Gate(int(argv[0]), int(argv[1]))

    def on_event(e: events.Event) -> None:
        if e.phase == "train" and e.kind in ("phase_start", "step_end"):
            gate.wait()

    with events.subscribe(on_event):
        code = cli.main(argv[2:])
    print(json.dumps({"waits": gate.waits}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
