"""Fraud routes: the review queue (`cases_router`) and, when present, rules and lists."""

from billfold.fraud.api.cases import router as cases_router

__all__ = ["cases_router"]
