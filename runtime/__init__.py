"""Runtime: backends that execute bundles, and benchmarks."""
