"""Speed benchmarks of the condensation iteration and of the evaluation protocol.

``python -m benchmarks.iteration`` times one jitted outer iteration and its parts;
``python -m benchmarks.evaluate`` times the evaluation trainer. Results are recorded in
BENCHMARKS.md at the repository root.
"""
