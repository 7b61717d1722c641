#!/usr/bin/env python3
"""Redis backup benchmark, against what an SRE would run instead, on the same data,
alternating runs, in one command:

    python3 benches/redis.py [--keys 2000000] [--runs 5]

Starts its own redis-server on a loopback port under target/bench/redis (persistence off,
diskless sync with no delay, as most production settings for replicas are), fills it once
with KEYS keys (strings, hashes, lists, sets and sorted sets of mixed, partly random
content), and prints median wall and CPU time, peak RSS and the ratio:
  lifeboat backup (local repository)
    vs `redis-cli --rdb FILE && zstd -T0 -3 FILE`                     target <= 1.0
"""

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, ROOT, measure, print_table, ratio_line, require  # noqa: E402
from datasets import pipe_commands, resp  # noqa: E402

WORK = ROOT / "target" / "bench" / "redis"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(port, keys):
    """RESP over redis-cli --pipe: fast, and the content is partly random so it does not
    compress like zeros."""
    rng = random.Random(42)
    words = ["session", "user", "cart", "token", "token", "order", "eu-west", "admin", "Ω", "✓"]

    def commands():
        for i in range(keys):
            kind = i % 10
            if kind < 6:
                value = " ".join(rng.choice(words) for _ in range(8)) + f" {rng.getrandbits(64):x}"
                yield resp("SET", f"s:{i}", value, "EX", 86400 + i % 3600)
            elif kind == 6:
                yield resp("HSET", f"h:{i}", "user", i, "cart", rng.getrandbits(32), "seen", time.time())
            elif kind == 7:
                yield resp("RPUSH", f"l:{i}", *(rng.getrandbits(24) for _ in range(5)))
            elif kind == 8:
                yield resp("SADD", f"set:{i}", *(rng.choice(words) + str(rng.getrandbits(8)) for _ in range(4)))
            else:
                yield resp("ZADD", f"z:{i}", rng.random(), "a", rng.random(), "b", rng.random(), "c")

    pipe_commands(port, commands())


def start_server(work):
    """A redis-server on a free loopback port keeping its files in WORK: persistence off,
    diskless sync with no delay. Returns (process, port) once it answers PING."""
    port = free_port()
    log = open(work / "redis.log", "ab")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
                               "--save", "", "--appendonly", "no", "--repl-diskless-sync", "yes",
                               "--repl-diskless-sync-delay", "0", "--dbfilename", "server.rdb"],
                              stdout=log, stderr=log)
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() == b"PONG":
            break
        time.sleep(0.1)
    return server, port


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    require("redis-server", "redis-cli", "zstd", "/usr/bin/time")

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    server, port = start_server(WORK)
    try:
        print(f"filling redis with {args.keys} keys (once)", flush=True)
        fill(port, args.keys)
        run(port, args)
    finally:
        server.terminate()
        server.wait()


def run(port, args):
    config = WORK / "lifeboat.toml"
    config.write_text(
        f'[compression]\nlevel = 3\n\n'
        f'[[repository]]\nname = "local"\ntype = "local"\npath = "{WORK / "repo"}"\n\n'
        f'[[job]]\nname = "bench"\nkind = "redis"\nurl = "redis://127.0.0.1:{port}"\n')
    env = dict(os.environ, LIFEBOAT_LOG="error")
    rdb = WORK / "cli.rdb"
    runs = {
        "lifeboat backup (local repository)": ([str(LIFEBOAT), "--config", str(config), "backup", "bench"], False),
        "redis-cli --rdb f && zstd -T0 -3 f": (
            f"redis-cli -p {port} --rdb '{rdb}' > /dev/null && zstd -q -f -T0 -3 '{rdb}' -o '{rdb}.zst'", True),
    }
    samples = {label: [] for label in runs}
    for number in range(args.runs):
        order = list(runs.items())
        if number % 2:
            order.reverse()
        for label, (argv, shell) in order:
            if not shell:
                shutil.rmtree(WORK / "repo", ignore_errors=True)
            os.sync()
            samples[label].append(measure(argv, env, shell=shell))
    raw = rdb.stat().st_size
    stored = sum(p.stat().st_size for p in (WORK / "repo").rglob("*.zst"))
    print(f"redis: {args.keys} keys, RDB {raw / 2**20:.0f} MiB, stored {stored / 2**20:.0f} MiB "
          f"(zstd -3: {(WORK / 'cli.rdb.zst').stat().st_size / 2**20:.0f} MiB); {args.runs} runs each, "
          f"alternating, cpus={os.cpu_count()}")
    values = print_table("backup", [(label, samples[label]) for label in runs])
    ratio_line("vs redis-cli --rdb && zstd", values["lifeboat backup (local repository)"],
               values["redis-cli --rdb f && zstd -T0 -3 f"], 1.0)


if __name__ == "__main__":
    main()
