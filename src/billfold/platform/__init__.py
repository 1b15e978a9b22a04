"""Shared mechanisms with no business rules; knows no service."""
