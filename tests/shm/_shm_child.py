"""Child processes for the shm tests: ``python _shm_child.py ROLE DOMAIN TOPIC [ARGS...]``.

Roles print ``ready`` once subscribed (or set up), then do their part:

* ``sub COUNT [GROUP]``: receive COUNT messages (bytes), print them as one JSON
  line ``{"got": [...]}`` (payloads decoded as text), exit.
* ``collect SECONDS [GROUP]``: receive for SECONDS after the first message, print
  ``{"got": [...]}``.
* ``view``: take one view and hold it (sleep) until killed.
* ``pub COUNT SIZE``: publish COUNT messages of SIZE bytes (``b"<i>:"`` + zeros)
  every 5 ms, then close.
* ``pubforever SIZE``: publish every 10 ms until killed.
* ``images COUNT``: publish COUNT ``ImageData`` frames (480x640x3, every pixel
  ``i % 256``, ``frame_id`` i) every 20 ms, then close.
"""

from __future__ import annotations

import json
import sys
import time

from msight_core.config import load_shm_config
from msight_core.pubsub.shm import ShmPubSub


def main() -> None:
    role, domain, topic, *args = sys.argv[1:]
    config = load_shm_config({"MSIGHT_SHM_DOMAIN": domain})
    group = args[1] if role in ("sub", "collect") and len(args) > 1 else None
    ps = ShmPubSub(config, group_id=group)
    try:
        if role in ("sub", "collect", "view"):
            ps.subscribe(topic)
            print("ready", flush=True)
        if role == "sub":
            got = []
            while len(got) < int(args[0]):
                message = ps.receive(30)
                if message is None:
                    break
                got.append(message.data.split(b":")[0].decode())
            print(json.dumps({"got": got, "stats": ps.stats()["dropped"]}), flush=True)
        elif role == "collect":
            got = []
            first = ps.receive(30)
            if first is not None:
                got.append(first.data.split(b":")[0].decode())
                end = time.monotonic() + float(args[0])
                while (left := end - time.monotonic()) > 0:
                    message = ps.receive(left)
                    if message is not None:
                        got.append(message.data.split(b":")[0].decode())
            print(json.dumps({"got": got}), flush=True)
        elif role == "view":
            view = ps.receive_view(30)
            print("held" if view is not None else "none", flush=True)
            time.sleep(120)
        elif role == "pub":
            count, size = int(args[0]), int(args[1])
            ps.reserve(topic, size)
            print("ready", flush=True)
            for i in range(count):
                head = b"%d:" % i
                ps.publish(topic, head + bytes(max(size - len(head), 0)))
                time.sleep(0.005)
        elif role == "images":
            import numpy as np

            from msight_core.data import ImageData

            shape = (480, 640, 3)
            ps.reserve(topic, ImageData(np.zeros(shape, np.uint8)).serialized_size())
            print("ready", flush=True)
            for i in range(int(args[0])):
                frame = ImageData(np.full(shape, i % 256, np.uint8), frame_id=i)
                ps.publish(topic, frame.serialize())
                time.sleep(0.02)
        elif role == "pubforever":
            size = int(args[0])
            ps.reserve(topic, size)
            print("ready", flush=True)
            i = 0
            while True:
                head = b"%d:" % i
                ps.publish(topic, head + bytes(max(size - len(head), 0)))
                i += 1
                time.sleep(0.01)
    finally:
        ps.close()


if __name__ == "__main__":
    main()
