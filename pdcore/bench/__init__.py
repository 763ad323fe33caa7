"""Benchmarks of a running server: `pdcore bench serving` (see docs/bench-serving.md)."""
