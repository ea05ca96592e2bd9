"""The claims of ``lota bench quality``, one module each, in report order.

Every claim module exposes the same names: ``NAME`` (its key in ``results.json`` and its
``--claims`` name), ``measure(q)`` (a generator over the shared ``Quality`` context: it yields
batches of ``(spec, scores)`` requests, the driver trains each batch, and at its end the claim
fills ``q.results[NAME]``), ``plot(results, out)`` (its PNG files, ``{figure: file name}``) and
``render(results, figs)`` (its markdown chunks). Adding a claim is one module here and one entry
in ``CLAIMS``.
"""

from __future__ import annotations

from . import calibration, ks, merge, real, safety, sequential, single

CLAIMS = (single, sequential, merge, safety, ks, calibration, real)
BY_NAME = {c.NAME: c for c in CLAIMS}
# what a bench runs when --claims is not given: the lab's base gets claims 1-4, KS-Lottery and the
# calibration claim; a real base gets its own compact protocol
DEFAULT = ("single", "sequential", "merge", "safety", "ks", "calibration")
DEFAULT_REAL = ("real",)
