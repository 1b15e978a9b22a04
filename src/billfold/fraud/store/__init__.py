"""Fraud SQL (being built)."""
