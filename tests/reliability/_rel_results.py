"""Results of the reliability tests: recorded rows, written as JSON and markdown.

Rows go to ``reliability-results.json`` and ``reliability-results.md`` under
pytest's base temporary directory (set by ``conftest.py``) and are printed in
the terminal summary, so the figures are visible without ``-s``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

_lock = threading.Lock()
results: list[dict[str, Any]] = []
paths: dict[str, Path] = {}


def record(kind: str, name: str, figures: dict[str, Any]) -> None:
    """Add one result row and rewrite the results files at once."""
    with _lock:
        results.append({"kind": kind, "name": name, **figures})
        base = paths.get("base")
        if base is None:
            return
        (base / "reliability-results.json").write_text(json.dumps(results, indent=2, default=str))
        (base / "reliability-results.md").write_text(markdown())


def markdown() -> str:
    """All rows as markdown tables, one per kind."""
    lines = ["# msight_core reliability results", ""]
    for kind in sorted({r["kind"] for r in results}):
        rows = [r for r in results if r["kind"] == kind]
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys and k != "kind"]
        lines += [f"## {kind}", "", "| " + " | ".join(keys) + " |"]
        lines.append("|" + "---|" * len(keys))
        for row in rows:
            lines.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)
