"""Running a migration's SQL script one statement at a time (asyncpg prepares each statement)."""

from __future__ import annotations

from alembic import op


def run_script(script: str) -> None:
    """Execute `script` statement by statement. Function bodies are $$-quoted and may contain
    ";\\n", so each `CREATE FUNCTION … $$` must end with a line `$$;` (the split point)."""
    for chunk in script.split("\n$$;\n"):
        if "$$" in chunk:
            head, _, body = chunk.partition("CREATE FUNCTION")
            _run_plain(head)
            op.execute("CREATE FUNCTION" + body + "\n$$")
        else:
            _run_plain(chunk)


def _run_plain(script: str) -> None:
    for statement in script.split(";\n"):
        code = [line for line in statement.splitlines() if not line.lstrip().startswith("--")]
        if "".join(code).strip():
            op.execute(statement)
