"""Fraud: rules (being built)."""
