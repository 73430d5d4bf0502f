"""Test helpers shipped with the package so tests and benchmarks share them (no network, no models)."""
