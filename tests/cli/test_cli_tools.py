"""``msight pub``, ``msight sub``, ``msight broker`` and the one-line error paths."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from msight_core.cli.tools import describe_payload, escape_control
from msight_core.testing.brokers import free_port

# What a hostile publisher puts in a name: retitle the terminal, ring, clear the screen.
EVIL = "\x1b]0;owned\x07\x1b[2J"
CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker_env", ["redis", "nats", "kafka"], indirect=True)
def test_pub_to_sub_round_trip(cli: Any, broker_env: dict[str, str], unique_topic: str) -> None:
    sub = cli.start("sub", unique_topic, "--count", "3", "--timeout", "60", env=broker_env)
    sub.wait_line("subscribed to", timeout=60, stream="err")
    pub = cli.run("pub", unique_topic, env=broker_env, stdin=b"alpha\nbeta\ngamma\n")
    assert pub.returncode == 0, pub.stderr
    assert "published 3 message(s)" in pub.stderr
    assert sub.wait(60) == 0, sub.stderr
    assert sub.stdout.splitlines() == ["alpha", "beta", "gamma"]


@pytest.mark.timeout(60)
def test_pub_whole_file_and_sub_saves_it(
    cli: Any, redis_server: Any, unique_topic: str, tmp_path: Path
) -> None:
    env = cli.env(redis_server.env())
    payload = bytes(range(256)) * 4096 + b"\n\r\n"  # 1 MB of binary with newlines
    source = tmp_path / "frame.bin"
    source.write_bytes(payload)
    out_dir = tmp_path / "got"
    sub = cli.start("sub", unique_topic, "-n", "1", "-t", "30", "--out", str(out_dir), env=env)
    sub.wait_line("subscribed to", timeout=30, stream="err")
    pub = cli.run("pub", unique_topic, "--file", str(source), "--whole", env=env)
    assert pub.returncode == 0, pub.stderr
    assert sub.wait(30) == 0, sub.stderr
    saved = Path(sub.stdout.strip())
    assert saved.parent == out_dir
    assert saved.read_bytes() == payload


@pytest.mark.timeout(60)
def test_sub_times_out_with_one_line_error(cli: Any, redis_server: Any, unique_topic: str) -> None:
    env = cli.env(redis_server.env())
    result = cli.run("sub", unique_topic, "--count", "2", "--timeout", "1", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "msight: error: timed out after 1s with 0 of 2 message(s)"
    )


@pytest.mark.timeout(60)
def test_sub_group_members_share_messages(cli: Any, nats_server: Any, unique_topic: str) -> None:
    pytest.importorskip("msight_core.pubsub.nats")
    env = cli.env(nats_server.env())
    members = [
        cli.start("sub", unique_topic, "--group", "workers", "--timeout", "8", env=env)
        for _ in range(2)
    ]
    for member in members:
        member.wait_line("in group workers", timeout=30, stream="err")
    lines = b"".join(b"m%d\n" % i for i in range(20))
    assert cli.run("pub", unique_topic, env=env, stdin=lines).returncode == 0
    got = []
    for member in members:
        assert member.wait(30) == 0, member.stderr
        got.extend(member.stdout.splitlines())
    assert sorted(got) == sorted(f"m{i}" for i in range(20))  # each message exactly once


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_broker_command_prints_exports_and_stops_on_ctrl_c(cli: Any, kind: str) -> None:
    broker = cli.start("broker", kind, env=cli.env())
    broker.wait_line("Ctrl-C to stop", timeout=30, stream="err")
    # stdout and stderr are read by separate threads: wait for the exports too.
    server_var = "MSIGHT_NATS_SERVERS" if kind == "nats" else "MSIGHT_REDIS_MESSAGE_BROKER_PORT"
    broker.wait_line(server_var, timeout=30, stream="out")
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in broker.stdout.splitlines()
    )
    env = cli.env({k: shlex.split(v)[0] for k, v in exports.items()})
    assert env["MSIGHT_PUBSUB_BACKEND"] == kind
    doctor = cli.run("doctor", env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    if kind == "nats":
        assert "max_payload: 64 MB" in doctor.stdout
        assert "JetStream on" in doctor.stdout
    assert broker.interrupt(timeout=30) == 0, broker.stderr
    assert "Traceback" not in broker.stderr
    host, port = env.get("MSIGHT_REDIS_MESSAGE_BROKER_HOST", "127.0.0.1"), None
    if kind == "redis":
        port = int(env["MSIGHT_REDIS_MESSAGE_BROKER_PORT"])
    else:
        port = int(env["MSIGHT_NATS_SERVERS"].rsplit(":", 1)[1].strip("]'\""))
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=2):
        pass  # the broker is gone


@pytest.mark.timeout(60)
def test_error_paths_print_one_line_and_exit_non_zero(
    cli: Any, redis_server: Any, unique_topic: str
) -> None:
    dead = cli.env({"MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(free_port())})
    cases = [
        # (args, env, stdin, expected code, text in the message)
        (["pub", unique_topic], dead, b"x\n", 1, "no redis broker reachable"),
        (["sub", unique_topic, "-n", "1"], dead, None, 1, "no redis broker reachable"),
        (["pub", "bad topic!"], cli.env(redis_server.env()), b"x\n", 1, "topic"),
        (["pub", unique_topic], cli.env({"MSIGHT_PUBSUB_BACKEND": "bogus"}), b"", 1, "bogus"),
        (["pub", unique_topic, "--file", "/nonexistent/file"], dead, None, 1, "No such file"),
        (["sub", unique_topic, "--count", "many"], dead, None, 2, "invalid int"),
        (["nosuchcommand"], dead, None, 2, "invalid choice"),
        (["bench", "--sizes", "huge"], dead, None, 1, "not a size"),
    ]
    for args, env, stdin, code, text in cases:
        result = cli.run(*args, env=env, stdin=stdin, timeout=30)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("msight: error:") and text in lines[0], (args, lines)


@pytest.mark.timeout(60)
def test_missing_extra_is_a_one_line_hint(cli: Any, nats_server: Any, unique_topic: str) -> None:
    # Hide nats-py from the child process, as if the 'nats' extra were not installed.
    code = (
        "import sys; sys.modules['nats'] = None; from msight_core.cli import main; "
        f"sys.exit(main(['pub', {unique_topic!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=cli.env(nats_server.env()), input="x\n", check=False,
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'msight-core[nats]'" in lines[0]


def test_escape_control_keeps_printable_text_and_escapes_the_rest() -> None:
    assert escape_control("camera 1 / é ✓ \\path") == "camera 1 / é ✓ \\path"
    assert escape_control(EVIL) == "\\x1b]0;owned\\x07\\x1b[2J"
    escaped = escape_control("a\x9b31mb\u202ec\nd\te\x7f")  # C1 CSI, bidi override, DEL
    assert escaped == "a\\x9b31mb\\u202ec\\nd\\te\\x7f"
    assert escape_control("x" * 500, limit=10) == "x" * 10 + "..."


def test_describe_payload_escapes_what_the_sender_wrote() -> None:
    """Issue 15 row 3: ``msight sub`` printed ``sensor_name`` raw."""
    from msight_core.data import ImageData, SensorData

    lines = [
        describe_payload(SensorData(sensor_name=EVIL).serialize()),
        describe_payload(ImageData(b"x", format="jp\x9beg", sensor_name="a" * 10_000).serialize()),
        describe_payload(b"plain \x1b[2J text"),
    ]
    for line in lines:
        assert not any(c in line for c in CONTROLS), repr(line)
    assert "sensor=\\x1b]0;owned\\x07" in lines[0]
    assert len(lines[1]) < 400


@pytest.mark.timeout(60)
def test_sub_escapes_what_a_raw_publisher_sends(
    cli: Any, redis_server: Any, unique_topic: str
) -> None:
    """A plain redis-py client publishes names with escape sequences to ``msight sub``."""
    from msight_core.config import load_redis_config
    from msight_core.data import DetectionResult, ImageData, SensorData
    from msight_core.utils import get_redis_client

    env = cli.env(redis_server.env())
    sub = cli.start("sub", unique_topic, "--count", "4", "--timeout", "30", env=env)
    sub.wait_line("subscribed to", timeout=30, stream="err")
    payloads = [
        SensorData(sensor_name=EVIL, device_name=EVIL).serialize(),
        ImageData(b"\xff\xd8", format="jpeg\x1b[31m", sensor_name="\u202ecam").serialize(),
        DetectionResult(sensor_name="\x9b2J", class_names=[EVIL]).serialize(),
        EVIL.encode(),
    ]
    client = get_redis_client(load_redis_config(redis_server.env()), socket_timeout=5)
    try:
        for payload in payloads:
            assert client.publish(unique_topic, payload) == 1
    finally:
        client.close()
    assert sub.wait(30) == 0, sub.stderr
    lines = sub.stdout.splitlines()
    assert len(lines) == 4, lines
    for line in lines:
        assert not any(c in line for c in CONTROLS), repr(line)
    assert lines[0].startswith("SensorData sensor=\\x1b]0;owned\\x07\\x1b[2J ")
    assert "image=jpeg\\x1b[31m 2 bytes" in lines[1]
