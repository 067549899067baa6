"""Fuzzing (see docs/reliability.md): coverage-guided fuzzing of the sans-I/O codec and
session (targets.py, run.py, seeds.py), and the black-box socket fuzzer of a running bridge
(blackbox.py, with mutate.py, inputs.py, exchange.py, summary.py)."""
