"""The README: two set-up commands, examples that run, links that lead somewhere."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from docs_blocks import ROOT, blocks

from msight_core.pubsub.base import PubSubBackend

README = ROOT / "README.md"


def test_readme_has_exactly_the_two_set_up_commands() -> None:
    setup = README.read_text().split("## Set up\n", 1)[1].split("\n## ", 1)[0]
    commands = [b.code.strip() for b in blocks(README) if b.code.strip() in setup]
    assert commands == [
        "pip install -e '.[all]' && msight demo",
        "pip install -e '.[test]' && python -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must run the README's test command"


def test_readme_links_point_at_existing_pages() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 8, local  # a link to each guide, the reference
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == []
    guides = {p.name for p in (ROOT / "docs" / "guides").glob("*.md")}
    assert guides <= {os.path.basename(link) for link in local}, "a guide the README omits"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["redis", "nats"])
def test_readme_python_examples_run(
    broker: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("MSIGHT_"):
            monkeypatch.delenv(name)
    server: Any = request.getfixturevalue(f"{broker}_server")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    ran = 0
    try:
        for block in blocks(README):
            if block.runs:
                exec(block.compiled(), namespace)  # noqa: S102 - our own README
                ran += 1
    finally:
        for value in list(namespace.values()):
            if isinstance(value, PubSubBackend):
                value.close()
    assert ran >= 1
