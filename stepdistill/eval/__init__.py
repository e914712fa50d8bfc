"""Evaluation: feature extractors, FID and friends, quality tables."""
