"""Scoring a model on the test split, the task metrics, and the sandbox that runs generated code."""
