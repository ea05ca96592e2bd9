"""What several benchmarks share: child processes (``child``), the model folders and data they
build (``inputs``), and their statistics (``stats``)."""
