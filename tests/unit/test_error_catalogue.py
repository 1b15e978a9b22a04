"""docs/api.md lists every problem `code` the code can answer, so clients can rely on it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Codes built at run time rather than written as literals.
_DERIVED = {
    # users/service.py: code=f"verification_{view.status}" for a verification that is not pending
    "verification_confirmed",
    "verification_expired",
    "verification_failed",
    # users/mfa.py: step_up_required(..., code="step_up_required") as a keyword default
    "step_up_required",
    # gateway/errors.py maps routing errors by status
    "method_not_allowed",
    "not_acceptable",
    "http_error",
}


def _codes_in_source() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "src" / "billfold").rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'code="([a-z_]+)"', text))
        found |= set(re.findall(r'^\s+code = "([a-z_]+)"', text, flags=re.MULTILINE))
        found |= set(re.findall(r'(?:status, )?code, title = (?:\d+, )?"([a-z_]+)"', text))
    return found | _DERIVED


def _codes_in_docs() -> set[str]:
    table = (ROOT / "docs" / "api.md").read_text().split("## Errors", 1)[1]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE))


def test_every_problem_code_is_documented() -> None:
    missing = _codes_in_source() - _codes_in_docs()
    assert not missing, f"add these codes to docs/api.md: {sorted(missing)}"


def test_the_catalogue_has_no_codes_the_code_never_uses() -> None:
    stale = _codes_in_docs() - _codes_in_source()
    assert not stale, f"docs/api.md lists codes nothing raises: {sorted(stale)}"
