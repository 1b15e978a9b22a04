"""`billfold ledger verify`: re-sum every posting and check every balance and invariant."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass
class Report:
    checks: dict[str, int] = field(default_factory=dict)  # check name -> discrepancies found
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        raise NotImplementedError


async def verify_ledger(engine: AsyncEngine) -> Report:
    raise NotImplementedError
