"""The fenced code blocks of the documentation site, as the tests run them.

A page's ```python blocks run in order in one namespace, like a notebook, with
the ``MSIGHT_*`` variables of a real broker set. A page chooses its brokers with
an HTML comment (invisible on the site); the default is Redis, the default
backend::

    <!-- docs-test: brokers=redis,nats,kafka -->

The same comment right above a fence, with ``only=``, limits that block to
some of the page's brokers (``nats-jetstream`` is NATS with
``MSIGHT_NATS_JETSTREAM=true``)::

    <!-- docs-test: only=nats-jetstream,kafka -->

A block that must not run starts with ``# not run: <reason>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=ticks)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_DIRECTIVE = re.compile(r"<!--\s*docs-test:(?P<args>.*?)-->", re.DOTALL)
_TITLE = re.compile(r'title="(?P<title>[^"]*)"')
NOT_RUN = "# not run:"


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    path: Path
    line: int  # line number of the block's first code line (1-based)
    language: str
    title: str | None
    code: str
    only: tuple[str, ...] | None = None  # brokers this block runs on (None: all the page's)

    @property
    def runs(self) -> bool:
        return self.language in ("python", "py") and not self.code.lstrip().startswith(NOT_RUN)

    def runs_on(self, broker: str) -> bool:
        return self.runs and (self.only is None or broker in self.only)

    @property
    def not_run_reason(self) -> str | None:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(NOT_RUN) :].strip() if first.startswith(NOT_RUN) else None

    def compiled(self) -> object:
        """Code object whose line numbers are the page's (tracebacks point at the page)."""
        return compile("\n" * (self.line - 1) + self.code, str(self.path), "exec")


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for match in _FENCE.finditer(text):
        info = match["info"].strip()
        language = info.split()[0].lower() if info else ""
        title = _TITLE.search(info)
        indent = len(match["indent"])
        lines = [line[indent:] for line in match["body"].splitlines()]
        before = text[: match.start()].rstrip()
        directive = (
            _DIRECTIVE.search(before[before.rfind("<!--") :]) if before.endswith("-->") else None
        )
        only = _args(directive["args"]).get("only") if directive else None
        out.append(
            Block(
                path=path,
                line=text.count("\n", 0, match.start("body")) + 1,
                language=language,
                title=title["title"] if title else None,
                code="\n".join(lines) + "\n",
                only=tuple(only.split(",")) if only else None,
            )
        )
    return out


def brokers(path: Path) -> list[str]:
    """The brokers a page's examples run against (``docs-test: brokers=...``)."""
    for match in _DIRECTIVE.finditer(path.read_text(encoding="utf-8")):
        args = _args(match["args"])
        if "brokers" in args:
            return [name for name in args["brokers"].split(",") if name]
    return ["redis"]


def _args(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split())
