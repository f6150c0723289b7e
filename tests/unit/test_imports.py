"""Importing the package connects to nothing and loads no broker client."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLIENTS = ("redis", "nats", "confluent_kafka", "iceoryx2")


def _loaded_after(code: str) -> set[str]:
    script = (
        f"{code}\nimport sys\nprint(' '.join(sorted(m for m in {CLIENTS!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},  # no MSIGHT_* variables at all
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import msight_core",
        "import msight_core.pubsub",
        "from msight_core.pubsub import get_pubsub, PubSubBackend",
        "from msight_core.pubsub.base import PubSubBackend",
        "from msight_core.pubsub.utils import get_nats_config, get_kafka_config",
        "import msight_core.config, msight_core.errors, msight_core.topics",
    ],
)
def test_no_client_imported(code: str) -> None:
    assert _loaded_after(code) == set()


def test_redis_backend_imports_no_other_client() -> None:
    assert _loaded_after("from msight_core.pubsub import RedisPubSub") <= {"redis"}


def test_shm_backend_imports_no_other_client() -> None:
    assert _loaded_after("from msight_core.pubsub import ShmPubSub") <= {"iceoryx2"}


def test_shm_without_iceoryx2_names_the_extra() -> None:
    # A finder that refuses iceoryx2, as if the shm extra were not installed.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'iceoryx2':\n"
        "            raise ImportError('no iceoryx2')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import msight_core.pubsub as p\n"
        "from msight_core.errors import MissingDependencyError\n"
        "try:\n"
        "    p.get_pubsub(env={'MSIGHT_PUBSUB_BACKEND': 'shm'})\n"
        "except MissingDependencyError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'msight-core[shm]'" in out.stdout


def test_unknown_attribute() -> None:
    import msight_core.pubsub

    with pytest.raises(AttributeError):
        msight_core.pubsub.NoSuchBackend  # noqa: B018
