"""`make bench`: the service against a hand-written script and bare Temporal workflows, on this machine.

Every figure is a ratio against a baseline measured in the same run: see bench/run.py and BENCHMARKS.md.
Development tooling only; the product never imports it.
"""
