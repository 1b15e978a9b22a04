"""Fraud: lists (being built)."""
