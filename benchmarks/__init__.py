"""Benchmarks: throughput and latency of the consumers on the real local stack; timing goals live here, not in tests."""
