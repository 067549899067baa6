"""Coverage-guided fuzzing of the sans-I/O codec and session (see docs/reliability.md)."""
