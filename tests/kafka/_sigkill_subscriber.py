"""Subprocess for the SIGKILL test: consume a group and print each payload."""

from __future__ import annotations

import json
import sys
import time

from msight_core.pubsub import KafkaPubSub
from msight_core.pubsub.utils import get_kafka_config

env, topic, group, delay = json.loads(sys.argv[1])
backend = KafkaPubSub(get_kafka_config(group, env=env))
backend.subscribe(topic)
print("READY", flush=True)
for payload in backend.listen():
    print(payload.decode(), flush=True)
    time.sleep(delay)
