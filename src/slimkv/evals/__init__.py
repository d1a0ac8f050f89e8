"""Evaluation tasks and scoring (the full suite is being built; see the issues)."""
