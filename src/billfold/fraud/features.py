"""Fraud: features (being built)."""
