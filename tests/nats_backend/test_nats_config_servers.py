"""NATS server list checks and TLS host name verification per server.

A bad port in ``MSIGHT_NATS_SERVERS`` is a ConfigError at load time (naming the
variable, never echoing credentials), not a ValueError from nats-py at the
first connect. With several TLS servers, each is verified against its own host
name: before, the first server's name was applied to all of them, so failing
over to another server (with its own certificate) failed verification.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from msight_core.config import load_nats_config, nats_connect_options
from msight_core.errors import ConfigError
from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer, free_port
from msight_core.testing.conformance import collect


@pytest.mark.parametrize(
    "servers",
    [
        "nats://h:notaport",
        "nats://h:99999",
        "nats://h:0",
        "nats://alice:s3cr3t-pw@h:notaport",
        "['nats://ok:4222', 'nats://alice:s3cr3t-pw@h:70000']",
        "h:12ab",
    ],
)
def test_bad_port_is_a_config_error_at_load(servers: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_nats_config(env={"MSIGHT_NATS_SERVERS": servers})
    text = str(info.value)
    assert "MSIGHT_NATS_SERVERS" in text and "port" in text
    assert "s3cr3t" not in text


def test_good_server_lists_still_load() -> None:
    for servers in ("nats://h:4222", "tls://a:1, nats://u:p@b:65535", "h:4222", "nats://h"):
        load_nats_config(env={"MSIGHT_NATS_SERVERS": servers})


def test_no_single_tls_hostname_for_all_servers() -> None:
    config = load_nats_config(
        env={"MSIGHT_NATS_SERVERS": "tls://a.example:4222, tls://b.example:4222"}
    )
    assert "tls_hostname" not in nats_connect_options(config)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _server_cert(d: Path, name: str, san: str, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=d,
    )  # fmt: skip
    return d / f"{name}.crt", d / f"{name}.key"


def test_each_tls_server_is_verified_against_its_own_name(tmp_path: Path) -> None:
    """Two servers, each with a certificate for its own name only: the client
    connects to the second when the first is down, and fails over between them."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is not installed")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
        "-keyout", "ca.key", "-out", "ca.crt", cwd=tmp_path,
    )  # fmt: skip
    ca, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    by_name = _server_cert(tmp_path, "byname", "DNS:localhost", ca, ca_key)
    by_ip = _server_cert(tmp_path, "byip", "IP:127.0.0.1", ca, ca_key)

    def tls_server(cert: tuple[Path, Path], port: int) -> NatsServer:
        args = ["--tls", "--tlscert", str(cert[0]), "--tlskey", str(cert[1])]
        return NatsServer(port=port, jetstream=False, extra_args=args)

    port_a, port_b = free_port(), free_port()
    env = {
        "MSIGHT_NATS_SERVERS": f"tls://localhost:{port_a}, tls://127.0.0.1:{port_b}",
        "MSIGHT_NATS_TLS_CA_CERT_FILE": str(ca),
        "MSIGHT_NATS_CONNECT_TIMEOUT": "2",
        "MSIGHT_NATS_RECONNECT_WAIT": "0.1",
    }
    topic = "t.tls.failover"
    with tls_server(by_ip, port_b) as server_b:
        # The first server is down: the second must verify as 127.0.0.1, not localhost.
        sub = NATSPubSub(get_nats_config(env=env))
        pub = NATSPubSub(get_nats_config(env=env))
        try:
            sub.subscribe(topic)
            pub.publish(topic, b"via-b")
            pub.flush()
            assert [m.data for m in collect(sub, 1, 10)] == [b"via-b"]
            # Now the other way round: B goes, A (a certificate for localhost only) comes.
            with tls_server(by_name, port_a):
                server_b.stop()
                for i in range(100):
                    pub.publish(topic, b"after-%d" % i)
                    if collect(sub, 1, 0.1):
                        break
                else:
                    pytest.fail("no message through the second TLS server after a failover")
                assert sub.reconnects >= 1 and pub.reconnects >= 1
        finally:
            pub.close()
            sub.close()
