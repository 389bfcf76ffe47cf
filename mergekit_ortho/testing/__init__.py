"""Fixture builders for the tests, the benchmarks and the demo: tiny checkpoints and adapters, offline."""
