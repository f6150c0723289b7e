"""Fixtures of the reliability tests: the results directory and a terminal summary.

Every measured figure (restart runs, shutdown and slow-consumer numbers) is
recorded with :func:`_rel_results.record`; the rows are written under pytest's
base temporary directory and printed at the end of the run, without ``-s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _rel_results
import pytest


@pytest.fixture(scope="session", autouse=True)
def _results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    _rel_results.paths["base"] = base
    return base


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _rel_results.results:
        return
    terminalreporter.section("msight reliability figures")
    for line in _rel_results.markdown().splitlines():
        terminalreporter.write_line(line)
    base = _rel_results.paths.get("base")
    if base is not None:
        terminalreporter.write_line(f"(also in {base / 'reliability-results.json'})")
