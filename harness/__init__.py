"""Noise-robust RL post-training harness: one training core, many algorithms, suites and noise settings."""
