"""Fraud: cases (being built)."""
