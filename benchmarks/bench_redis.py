"""RedisPubSub against raw redis-py on the same server, in one run.

For each message size, a publisher process sends a burst of messages and a
subscriber process (started first) receives them; both run once through
``RedisPubSub`` and once through plain redis-py (a ``pipeline()`` of PUBLISH
flushed every 100 messages, ``PubSub.get_message()`` with the hiredis parser). Each payload carries its send time, so the
subscriber measures end-to-end latency.

Columns: publish rate (msg/s while publishing), drain rate (msg/s between the
first and last message received), lost (sent - received), p50/p99 latency.

Usage::

    python benchmarks/bench_redis.py                 # embedded server, default sizes
    python benchmarks/bench_redis.py --sizes 1024 1048576 --count 50000 300
    python benchmarks/bench_redis.py --rate 100000   # pace the 1 KB publisher
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

STAMP = struct.Struct("<d")
TOPIC = "bench.redis"


def _env(port: int) -> dict[str, str]:
    return {
        "MSIGHT_REDIS_MESSAGE_BROKER_HOST": "127.0.0.1",
        "MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(port),
    }


def run_sub(kind: str, port: int, count: int, idle: float) -> dict[str, Any]:
    latencies: list[float] = []
    first = last = 0.0
    if kind == "msight":
        from msight_core.config import load_redis_config
        from msight_core.pubsub import RedisPubSub

        sub = RedisPubSub(load_redis_config(_env(port)))
        sub.subscribe(TOPIC)
        print("ready", flush=True)
        while len(latencies) < count:
            message = sub.receive(idle)
            if message is None:
                break
            now = time.time()
            latencies.append(now - STAMP.unpack_from(message.data)[0])
            first = first or now
            last = now
        reconnects = sub.stats().get("subscriber_reconnects", 0)
        sub.close()
    else:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(TOPIC)
        pubsub.get_message(timeout=1)
        print("ready", flush=True)
        reconnects = 0
        while len(latencies) < count:
            try:
                message = pubsub.get_message(timeout=idle)
            except redis.ConnectionError:
                reconnects += 1
                break
            if message is None:
                break
            now = time.time()
            latencies.append(now - STAMP.unpack_from(message["data"])[0])
            first = first or now
            last = now
        pubsub.close()
    return {
        "received": len(latencies),
        "drain": (len(latencies) - 1) / (last - first)
        if len(latencies) > 1 and last > first
        else 0.0,
        "p50": statistics.median(latencies) * 1e3 if latencies else float("nan"),
        "p99": statistics.quantiles(latencies, n=100)[98] * 1e3
        if len(latencies) > 2
        else float("nan"),
        "disconnects": reconnects,
    }


def run_pub(kind: str, port: int, count: int, size: int, rate: float) -> dict[str, Any]:
    body = bytearray(os.urandom(size))
    step = max(1, int(rate / 200)) if rate else 0
    if kind == "msight":
        from msight_core.config import load_redis_config
        from msight_core.pubsub import RedisPubSub

        pub = RedisPubSub(load_redis_config(_env(port)))
        send = pub.publish
    else:
        import redis

        # The fastest plain redis-py publisher: a pipeline sent every 100 messages
        # (or every 4 MB), so the raw subscriber faces the same rate as ours.
        pipe = redis.Redis(host="127.0.0.1", port=port).pipeline(transaction=False)
        batch = max(1, min(100, (4 << 20) // max(size, 1)))

        def send(topic: str, data: bytes) -> None:
            pipe.publish(topic, data)
            if len(pipe) >= batch:
                pipe.execute()

    start = time.perf_counter()
    for i in range(count):
        STAMP.pack_into(body, 0, time.time())
        send(TOPIC, bytes(body))
        if step and (i + 1) % step == 0:
            time.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
    if kind == "msight":
        pub.flush(120)
    elif len(pipe):
        pipe.execute()
    elapsed = time.perf_counter() - start
    if kind == "msight":
        pub.close()
    return {"publish": count / elapsed}


def measure(kind: str, port: int, count: int, size: int, rate: float) -> dict[str, Any]:
    me = [sys.executable, __file__]
    sub = subprocess.Popen(
        me + ["--role", "sub", "--kind", kind, "--port", str(port), "--n", str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == "ready"
    pub = subprocess.run(
        me + ["--role", "pub", "--kind", kind, "--port", str(port), "--n", str(count),
              "--size", str(size), "--rate", str(rate)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out, _ = sub.communicate(timeout=600)
    result = json.loads(out.strip().splitlines()[-1])
    result.update(json.loads(pub.stdout.strip().splitlines()[-1]))
    result["lost"] = count - result["received"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=["main", "pub", "sub"], default="main")
    parser.add_argument("--kind", choices=["msight", "raw"], default="msight")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="publisher pacing in msg/s (0: flat out)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1024, 1024 * 1024, 4 * 1024 * 1024]
    )
    parser.add_argument("--count", type=int, nargs="+", default=[100_000, 300, 100])
    parser.add_argument("--idle", type=float, default=3.0)
    args = parser.parse_args()

    if args.role == "sub":
        print(json.dumps(run_sub(args.kind, args.port, args.n, args.idle)), flush=True)
        return
    if args.role == "pub":
        print(json.dumps(run_pub(args.kind, args.port, args.n, args.size, args.rate)), flush=True)
        return

    from msight_core.testing.brokers import RedisServer

    counts = dict(zip(args.sizes, args.count + [args.count[-1]] * len(args.sizes)))
    header = f"{'size':>9} {'client':>7} {'publish/s':>10} {'drain/s':>10} {'lost':>7} {'disc':>5} {'p50 ms':>8} {'p99 ms':>8}"
    with RedisServer() as server:
        print(f"Redis server {server.address}; publisher and subscriber in separate processes")
        print(header)
        print("-" * len(header))
        for size in args.sizes:
            for kind in ("raw", "msight"):
                r = measure(
                    kind, server.port, counts[size], size, args.rate if size <= 4096 else 0.0
                )
                print(
                    f"{size:>9} {kind:>7} {r['publish']:>10.0f} {r['drain']:>10.0f} {r['lost']:>7} "
                    f"{r['disconnects']:>5} {r['p50']:>8.2f} {r['p99']:>8.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
