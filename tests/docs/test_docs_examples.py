"""Every ```python block of docs/ runs, against real brokers, so the docs cannot drift.

Blocks of a page run in order in one namespace, with the ``MSIGHT_*`` variables
of the session's embedded broker set (the page's ``docs-test: brokers=...``
comment chooses which; Redis by default). A failing example fails here with a
traceback pointing at the Markdown line.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from docs_blocks import DOCS, Block, blocks, brokers, pages

from msight_core.pubsub.base import PubSubBackend

# tansu assigns a new group's partitions after about half the session timeout
# (as in tests/conformance/test_kafka.py): test speed, not something a reader sets.
KAFKA_TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}

#: Blocks marked ``# not run:`` may exist, but few.
MAX_NOT_RUN = 6

CASES = [
    pytest.param(page, broker, id=f"{page.relative_to(DOCS)}[{broker}]")
    for page in pages()
    for broker in brokers(page)
    if any(block.runs_on(broker) for block in blocks(page))
]


def _broker_env(request: pytest.FixtureRequest, broker: str) -> dict[str, str]:
    if broker == "memory":
        return {"MSIGHT_PUBSUB_BACKEND": "memory"}
    kind, _, variant = broker.partition("-")
    server: Any = request.getfixturevalue(f"{kind}_server")
    env = dict(server.env())
    if kind == "kafka":
        env.update(KAFKA_TEST_ENV)
    if variant == "jetstream":
        env["MSIGHT_NATS_JETSTREAM"] = "true"
    elif variant:
        raise ValueError(f"unknown broker variant {broker!r}")
    return env


def _close_backends(namespace: dict[str, Any]) -> None:
    for value in list(namespace.values()):
        if isinstance(value, PubSubBackend):
            value.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("page", "broker"), CASES)
def test_page_examples_run(
    page: Any, broker: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("MSIGHT_"):
            monkeypatch.delenv(name)
    for name, value in _broker_env(request, broker).items():
        monkeypatch.setenv(name, value)
    namespace: dict[str, Any] = {"__name__": f"docs_example_{page.stem.replace('-', '_')}"}
    try:
        for block in blocks(page):
            if block.runs_on(broker):
                exec(block.compiled(), namespace)  # noqa: S102 - our own documentation
    finally:
        _close_backends(namespace)


def test_not_run_blocks_are_few_and_say_why() -> None:
    skipped: list[Block] = [b for p in pages() for b in blocks(p) if b.not_run_reason is not None]
    for block in skipped:
        assert block.not_run_reason, f"{block.path}:{block.line}: '# not run:' needs a reason"
    assert len(skipped) <= MAX_NOT_RUN, [f"{b.path.name}:{b.line}" for b in skipped]


def test_every_guide_has_runnable_python() -> None:
    for page in (DOCS / "guides").glob("*.md"):
        assert any(block.runs for block in blocks(page)), f"{page.name} has no runnable example"


def test_python_fences_are_tagged() -> None:
    # An untagged fence would silently escape the runner: every block names its language.
    for page in pages():
        for block in blocks(page):
            assert block.language, f"{block.path}:{block.line}: fence without a language"
