"""Wallet routes: balances, statement, top-ups and withdrawals."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["wallet"])
