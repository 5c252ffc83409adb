"""Evaluation: benchmarks and their graders, metrics (pass@k, mean@n, maj@k), the code sandbox."""
