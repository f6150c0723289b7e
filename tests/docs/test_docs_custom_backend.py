"""The custom backend of docs/guides/custom-backend.md passes the conformance suite.

The page's ``my_backend.py`` and ``tests/test_my_backend.py`` blocks are run
into this module, so pytest collects the page's own ``TestMyCustomPubSub``
(a :class:`~msight_core.testing.conformance.PubSubConformance` subclass) and runs
it against the plugin's real Redis server.
"""

from __future__ import annotations

from docs_blocks import DOCS, blocks

PAGE = DOCS / "guides" / "custom-backend.md"
FILES = ("my_backend.py", "tests/test_my_backend.py")

_found = {block.title: block for block in blocks(PAGE) if block.title in FILES}
assert set(_found) == set(FILES), f"{PAGE} lost a block: {sorted(set(FILES) - set(_found))}"
for _title in FILES:
    exec(_found[_title].compiled(), globals())  # noqa: S102 - our own documentation

assert "TestMyCustomPubSub" in globals()
