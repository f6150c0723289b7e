"""Configuration parsing: one reader of the environment, typed errors, masked secrets."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from msight_core.config import (
    KafkaConfig,
    OverflowPolicy,
    Secret,
    backend_name,
    load_kafka_config,
    load_nats_config,
    load_queue_config,
    load_redis_config,
    parse_bool,
    parse_server_list,
)
from msight_core.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("['nats://localhost:4222']", ("nats://localhost:4222",)),
        ('["a:1", "b:2"]', ("a:1", "b:2")),
        ("['a:1', 'b:2',]", ("a:1", "b:2")),
        ("a:1,b:2", ("a:1", "b:2")),
        ("  a:1 ,  b:2  ", ("a:1", "b:2")),
        ("localhost:9092", ("localhost:9092",)),
        ("[ 'tls://h:1' ]", ("tls://h:1",)),
    ],
)
def test_server_lists(text: str, expected: tuple[str, ...]) -> None:
    assert parse_server_list(text, "X") == expected


@pytest.mark.parametrize(
    "text",
    ["[]", "['a:1'", "a:1]", "['a:1',,'b:2']", "['a b']", "__import__('os')", "['a'+'b']", ","],
)
def test_malformed_server_lists_name_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="MSIGHT_NATS_SERVERS"):
        load_nats_config(env={"MSIGHT_NATS_SERVERS": text})


def test_server_list_is_never_evaluated() -> None:
    with pytest.raises(ConfigError):
        parse_server_list("[__import__('os').system('false')]", "X")


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on"])
def test_true_values(value: str) -> None:
    assert parse_bool(value) is True


@pytest.mark.parametrize("value", ["false", "0", "no", "off", "False"])
def test_false_values(value: str) -> None:
    assert parse_bool(value) is False


def test_bad_bool_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MSIGHT_REDIS_MESSAGE_BROKER_USE_TLS"):
        load_redis_config(env={"MSIGHT_REDIS_MESSAGE_BROKER_USE_TLS": "maybe"})


@pytest.mark.parametrize("port", ["abc", "0", "70000", "-1", "6379.5"])
def test_bad_port(port: str) -> None:
    with pytest.raises(ConfigError, match="MSIGHT_REDIS_MESSAGE_BROKER_PORT"):
        load_redis_config(env={"MSIGHT_REDIS_MESSAGE_BROKER_PORT": port})


def test_redis_defaults_and_values() -> None:
    assert load_redis_config(env={}).host == "localhost"
    config = load_redis_config(
        env={
            "MSIGHT_REDIS_MESSAGE_BROKER_HOST": "redis.local",
            "MSIGHT_REDIS_MESSAGE_BROKER_PORT": "6380",
            "MSIGHT_REDIS_MESSAGE_BROKER_DB": "2",
            "MSIGHT_REDIS_MESSAGE_BROKER_USERNAME": "edge",
            "MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD": "hunter2-redis",
            "MSIGHT_REDIS_MESSAGE_BROKER_USE_CLUSTER": "true",
            "MSIGHT_REDIS_MESSAGE_BROKER_CLUSTER_NODES": "['a:7000', 'b:7001']",
        }
    )
    assert (config.host, config.port, config.db, config.username) == (
        "redis.local",
        6380,
        2,
        "edge",
    )
    assert config.password is not None and config.password.reveal() == "hunter2-redis"
    assert config.use_cluster and config.cluster_nodes == ("a:7000", "b:7001")
    assert "hunter2-redis" not in repr(config) and "hunter2-redis" not in str(config)


def test_secrets_never_show() -> None:
    secret = Secret("s3cr3t-value")
    assert "s3cr3t" not in repr(secret) + str(secret) + f"{secret}" + f"{secret!r}"
    env = {
        "MSIGHT_NATS_PASSWORD": "nats-pass-123",
        "MSIGHT_NATS_TOKEN": "nats-token-456",
        "MSIGHT_NATS_NKEY_SEED": "SUAXXXXSEED",
        "MSIGHT_NATS_USER_JWT": "eyJwt-789",
    }
    text = repr(load_nats_config(env=env))
    for value in env.values():
        assert value not in text
    kafka = load_kafka_config(
        env={
            "MSIGHT_KAFKA_SASL_PASSWORD": "kafka-pass-000",
            "MSIGHT_KAFKA_CLIENT_SSL_KEY_PASSWORD": "passthrough-secret",
        }
    )
    assert "kafka-pass-000" not in repr(kafka)
    assert "passthrough-secret" not in repr(kafka)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)


def test_kafka_pass_through() -> None:
    config = load_kafka_config(
        "grp",
        env={
            "MSIGHT_KAFKA_SERVERS": "['k1:9092', 'k2:9092']",
            "MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000",
            "MSIGHT_KAFKA_PRODUCER_LINGER_MS": "5",
            "MSIGHT_KAFKA_CLIENT_CLIENT_ID": "edge-1",
        },
    )
    assert config.group_id == "grp"
    assert config.servers == ("k1:9092", "k2:9092")
    assert config.consumer["session.timeout.ms"] == "6000"
    assert config.producer["linger.ms"] == "5"
    assert config.client["client.id"] == "edge-1"
    assert isinstance(
        KafkaConfig(producer={"sasl.password": "x"}).producer["sasl.password"], Secret
    )


def test_backend_name() -> None:
    assert backend_name({}) == "redis"
    assert backend_name({"MSIGHT_PUBSUB_BACKEND": " NATS "}) == "nats"
    with pytest.raises(ConfigError, match="redis, nats, kafka, memory"):
        backend_name({"MSIGHT_PUBSUB_BACKEND": "rabbitmq"})


def test_queue_config() -> None:
    config = load_queue_config(
        {"MSIGHT_QUEUE_MAX_MESSAGES": "10", "MSIGHT_QUEUE_OVERFLOW": "DROP_NEWEST"}
    )
    assert config.max_messages == 10 and config.overflow is OverflowPolicy.DROP_NEWEST
    with pytest.raises(ConfigError, match="MSIGHT_QUEUE_OVERFLOW"):
        load_queue_config({"MSIGHT_QUEUE_OVERFLOW": "explode"})
    with pytest.raises(ConfigError, match="MSIGHT_QUEUE_MAX_BYTES"):
        load_queue_config({"MSIGHT_QUEUE_MAX_BYTES": "0"})


def test_overrides_and_unknown_override() -> None:
    assert load_nats_config(env={}, jetstream=True).jetstream is True
    with pytest.raises(ConfigError):
        load_nats_config(env={}, no_such_field=1)


@pytest.mark.parametrize("value", ["1e10", "2000001"])
def test_kafka_delivery_timeout_beyond_librdkafka_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="MSIGHT_KAFKA_DELIVERY_TIMEOUT must be at most"):
        load_kafka_config(env={"MSIGHT_KAFKA_DELIVERY_TIMEOUT": value})
    config = load_kafka_config(env={"MSIGHT_KAFKA_DELIVERY_TIMEOUT": "2000000"})
    assert config.delivery_timeout == 2_000_000


# -- TLS settings (issue 15, row 7) -------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "prefix", "files"),
    [
        (load_redis_config, "MSIGHT_REDIS_MESSAGE_BROKER_", ("TLS_CA_CERT_FILE", "TLS_CERT_FILE")),
        (lambda env: load_nats_config(env=env), "MSIGHT_NATS_", ("TLS_CA_CERT_FILE",)),
        (lambda env: load_kafka_config(env=env), "MSIGHT_KAFKA_", ("TLS_CA_CERT_FILE",)),
    ],
)
def test_tls_files_turn_tls_on_or_conflict(load: Any, prefix: str, files: tuple[str, ...]) -> None:
    assert load({}).use_tls is False
    for name in files:
        assert load({prefix + name: "/etc/ssl/ca.pem"}).use_tls is True
        with pytest.raises(ConfigError, match=f"{prefix}USE_TLS=true"):
            load({prefix + name: "/etc/ssl/ca.pem", prefix + "USE_TLS": "false"})
    assert load({prefix + "USE_TLS": "true"}).use_tls is True


def test_kafka_sasl_with_a_ca_file_is_not_sent_in_clear() -> None:
    from msight_core.config import kafka_client_conf

    config = load_kafka_config(
        env={
            "MSIGHT_KAFKA_SASL_MECHANISM": "PLAIN",
            "MSIGHT_KAFKA_SASL_USERNAME": "u",
            "MSIGHT_KAFKA_SASL_PASSWORD": "pw",
            "MSIGHT_KAFKA_TLS_CA_CERT_FILE": "/etc/ssl/ca.pem",
        }
    )
    assert kafka_client_conf(config)["security.protocol"] == "SASL_SSL"


def test_unverified_tls_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    import msight_core.config as config_module

    config_module._warned_no_verify.clear()
    caplog.set_level(logging.WARNING, logger="msight_core.config")
    env = {"MSIGHT_NATS_USE_TLS": "true", "MSIGHT_NATS_TLS_VERIFY": "false"}
    load_nats_config(env=env)
    load_nats_config(env=env)
    load_nats_config(env={"MSIGHT_NATS_TLS_VERIFY": "false"})  # no TLS: nothing to say
    warnings = [r for r in caplog.records if "verification is off" in r.getMessage()]
    assert len(warnings) == 1 and "MSIGHT_NATS_TLS_VERIFY" in warnings[0].getMessage()
    redis_env = {
        "MSIGHT_REDIS_MESSAGE_BROKER_USE_TLS": "true",
        "MSIGHT_REDIS_MESSAGE_BROKER_TLS_VERIFY": "false",
    }
    load_redis_config(redis_env)
    load_kafka_config(env={"MSIGHT_KAFKA_CLIENT_ENABLE_SSL_CERTIFICATE_VERIFICATION": "false"})
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "MSIGHT_REDIS_MESSAGE_BROKER_TLS_VERIFY" in warned
    assert "MSIGHT_KAFKA_CLIENT_ENABLE_SSL_CERTIFICATE_VERIFICATION" in warned
