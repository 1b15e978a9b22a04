"""Fraud routes for administrators: the review queue (`cases_router`), rules and lists
(`rules_router`)."""

from billfold.fraud.api.cases import router as cases_router
from billfold.fraud.api.rules import rules_router

__all__ = ["cases_router", "rules_router"]
