"""Fraud: service (being built)."""
