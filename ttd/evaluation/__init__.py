"""Evaluation, calibration and metrics."""
