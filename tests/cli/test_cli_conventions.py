"""Conventions users of the package and of the command line rely on (issue 20, item 6)."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

import msight_core
from msight_core.cli import build_parser
from msight_core.testing import pytest_plugin

ROOT = Path(__file__).resolve().parents[2]
#: Variables read outside config.py: the embedded brokers' program paths (testing/brokers.py).
BROKER_BINARIES = {"MSIGHT_REDIS_SERVER_BIN", "MSIGHT_NATS_SERVER_BIN", "MSIGHT_TANSU_BIN"}


def _config_reference() -> Any:
    """docs/_hooks/config_reference.py: extracts the variables from config.py's AST."""
    name = "msight_docs_config_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "docs" / "_hooks" / "config_reference.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def readme_variables(text: str) -> set[str]:
    """Every MSIGHT_* name the README's Configuration section spells out.

    A code span ending in ``_`` is a prefix for the upper-case code spans after it in
    the same bullet (`MSIGHT_NATS_` + `SERVERS` -> MSIGHT_NATS_SERVERS); a code span
    that is a whole ``MSIGHT_`` name counts as it is.
    """
    section = text.split("## Configuration\n", 1)[1].split("\n## ", 1)[0]
    bullets = re.split(r"\n- ", section)[1:]
    names: set[str] = set()
    for bullet in bullets:
        prefix = None
        for span in re.findall(r"`([^`]+)`", bullet):
            if re.fullmatch(r"MSIGHT_[A-Z0-9_]*_", span):
                prefix = span
            elif re.fullmatch(r"MSIGHT_[A-Z0-9_]*[A-Z0-9]", span):
                names.add(span)
            elif prefix and re.fullmatch(r"[A-Z][A-Z0-9_]*(_\*)?", span):
                names.add(prefix + span)
    return names


def test_readme_lists_every_variable_the_code_reads() -> None:
    read = {v.name for v in _config_reference().variables()} | BROKER_BINARIES
    brokers = (ROOT / "src" / "msight_core" / "testing" / "brokers.py").read_text()
    assert all(f'"{name}"' in brokers for name in BROKER_BINARIES)
    listed = readme_variables((ROOT / "README.md").read_text())
    assert sorted(read - listed) == [], "variables the README does not mention"
    assert sorted(listed - read) == [], "README names variables nothing reads"


def test_py_typed_ships() -> None:
    assert (ROOT / "src" / "msight_core" / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["msight_core"]
    assert "mcap>=1.2" in pyproject["project"]["optional-dependencies"]["tools"]
    assert "tools" in pyproject["project"]["optional-dependencies"]["all"][0]


def test_library_logger_has_a_null_handler_and_root_is_untouched() -> None:
    handlers = logging.getLogger("msight_core").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_version_comes_from_package_metadata() -> None:
    assert msight_core.__version__ == importlib.metadata.version("msight-core")


def test_plugin_fixtures_are_prefixed() -> None:
    names = [n for n, obj in vars(pytest_plugin).items() if hasattr(obj, "_fixture_function")
             or type(obj).__name__ == "FixtureFunctionDefinition"]  # fmt: skip
    assert names, "no fixtures found in the plugin"
    assert all(n.startswith("msight_") for n in names), names
    assert set(pytest_plugin.__all__) == set(names)


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_and_option_has_help_with_defaults() -> None:
    parser = build_parser()
    commands = _commands(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {a.dest for a in sub._choices_actions if a.help}
    for name, command in commands.items():
        if name != "echo":
            assert name in helped, f"msight {name} has no help line"
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"msight {name} {action.option_strings or action.dest}"
            flag = action.nargs == 0  # on/off flags say what they do in their name
            if (
                action.default not in (None, argparse.SUPPRESS)
                and action.option_strings
                and not flag
            ):
                assert "default" in action.help or f"(default: {action.default}" in text, (
                    f"msight {name} {action.option_strings[0]} does not show its default"
                )


@pytest.mark.parametrize(
    "command", ["record", "play", "view", "topics", "hz", "bw", "echo", "broker", "sub"]
)
def test_help_of_the_tools(cli: Any, command: str) -> None:
    result = cli.run(command, "--help", env=cli.env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"usage: msight {'sub' if command == 'echo' else command}" in result.stdout
    assert "(default:" in result.stdout or command in ("echo", "sub", "topics")


@pytest.mark.parametrize("command", [["pub", "t.x"], ["sub", "t.x"], ["record", "t.x"],
                                     ["hz", "t.x"]])  # fmt: skip
def test_memory_backend_is_refused_with_a_reason(cli: Any, command: list[str]) -> None:
    result = cli.run(*command, "--backend", "memory", env=cli.env(), stdin=b"x\n")
    assert result.returncode == 2
    assert "memory backend" in result.stderr and "inside one process" in result.stderr


def test_broker_takes_backend_and_keeps_the_positional(cli: Any) -> None:
    result = cli.run("broker", "nats", "--backend", "redis", env=cli.env())
    assert result.returncode == 2 and "pick one" in result.stderr
    result = cli.run("broker", env=cli.env({"MSIGHT_PUBSUB_BACKEND": "memory"}))
    assert result.returncode == 2 and "needs no broker" in result.stderr


@pytest.mark.timeout(60)
def test_broker_backend_option_runs_the_broker(cli: Any) -> None:
    broker = cli.start("broker", "--backend", "redis", env=cli.env())
    broker.wait_line("MSIGHT_REDIS_MESSAGE_BROKER_PORT", timeout=40, stream="out")
    assert broker.interrupt() == 0


def test_fixture_aliases_of_the_project_are_not_in_the_plugin() -> None:
    for short in ("redis_server", "nats_server", "kafka_server", "unique_topic"):
        assert not hasattr(pytest_plugin, short)
