"""lota's benchmarks. Each runs from the repository root as ``python -m bench.NAME`` (see
bench/README.md); the shared pieces are in ``bench.common``."""
