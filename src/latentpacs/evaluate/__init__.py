"""Evaluation: metrics, classic-codec baselines, plots and reports."""
