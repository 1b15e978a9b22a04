"""Fraud admin and user routes (being built)."""
