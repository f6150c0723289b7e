"""The documentation site builds with ``mkdocs build --strict`` and shows what it must.

Strict: a broken link, a missing cross-reference or a docstring that fails to
render is an error. The build runs once per session (about 10 s) into a
temporary directory; the tests then read the HTML.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from docs_blocks import ROOT

from msight_core import config


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner, not a warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-d", str(out)],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out


def _html(site: Path, page: str) -> str:
    return (site / page / "index.html").read_text(encoding="utf-8")


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_index_renders(site: Path) -> None:
    html = (site / "index.html").read_text(encoding="utf-8")
    assert "<h1" in html and "msight-core" in html
    for guide in ("getting-started", "choosing-a-backend", "scaling-out", "security"):
        assert f'href="guides/{guide}/"' in html
    assert 'href="reference/pubsub-base/"' in html


def test_pubsub_backend_reference_has_the_method_sections(site: Path) -> None:
    html = _html(site, "reference/pubsub-base")
    for method in ("subscribe", "publish", "listen", "flush", "close"):
        anchor = f'id="msight_core.pubsub.base.PubSubBackend.{method}"'
        assert anchor in html, f"no section for PubSubBackend.{method}"
    text = _text(html)
    for words in ("Blocks until the broker confirms", "Thread-safe", "Raises", "ClosedError"):
        assert words in text


def test_every_backend_class_is_documented(site: Path) -> None:
    for page, cls in [
        ("reference/redis", "msight_core.pubsub.redis.RedisPubSub"),
        ("reference/nats", "msight_core.pubsub.nats.NATSPubSub"),
        ("reference/kafka", "msight_core.pubsub.kafka.KafkaPubSub"),
        ("reference/shm", "msight_core.pubsub.shm.ShmPubSub"),
        ("reference/memory", "msight_core.pubsub.memory.MemoryPubSub"),
        ("reference/pubsub", "msight_core.pubsub.get_pubsub"),
    ]:
        assert f'id="{cls}"' in _html(site, page), cls


def test_sphinx_roles_are_rendered_as_links(site: Path) -> None:
    html = _html(site, "reference/pubsub-base")
    assert ":class:" not in _text(html) and ":meth:" not in _text(html)
    assert 'href="../errors/#msight_core.errors.ClosedError"' in html


class _Recording(dict):  # type: ignore[type-arg]
    """An empty environment that remembers which variables were asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def _variables_read_by_the_loaders() -> set[str]:
    env = _Recording()
    config.backend_name(env)
    config.load_redis_config(env)
    config.load_nats_config(env=env)
    config.load_kafka_config(env=env)
    config.load_shm_config(env)
    config.load_metrics_config(env)
    return env.asked


def _hook() -> Any:
    """docs/_hooks/config_reference.py, the mkdocs hook that writes the table."""
    name = "msight_docs_config_reference"
    if name not in sys.modules:
        path = ROOT / "docs" / "_hooks" / "config_reference.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_config_table_lists_exactly_what_the_loaders_read() -> None:
    # The table is generated from config.py's source; the loaders, run against a
    # recording environment, say independently which variables they read.
    listed = {v.name for v in _hook().variables() if not v.name.endswith("*")}
    assert listed == _variables_read_by_the_loaders()


def test_config_table_has_type_default_and_meaning() -> None:
    for var in _hook().variables():
        assert var.type and var.default and len(var.meaning) > 10, var


def test_config_reference_page_shows_every_variable(site: Path) -> None:
    text = _text(_html(site, "reference/config"))
    for name in _variables_read_by_the_loaders():
        assert name in text, name
    for prefix in ("MSIGHT_KAFKA_PRODUCER_*", "MSIGHT_KAFKA_CONSUMER_*", "MSIGHT_KAFKA_CLIENT_*"):
        assert prefix in text
    assert "<!-- msight-config-variables -->" not in _html(site, "reference/config")
