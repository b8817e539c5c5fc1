"""Benchmarks of lsm_registry, run from the repository root as ``python -m bench.<name>``.

``bench.store`` is the run store the accuracy benchmarks share; each other module is one
benchmark with its own ``--help``.
"""
