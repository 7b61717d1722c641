#!/usr/bin/env python3
"""Restore of a large object over a slow, distant link: a files backup of incompressible data
(2 GiB by default, stored as one object like a base backup's tar) in one SeaweedFS region,
restored through a throttling proxy that caps every connection at a bandwidth and delays every
request by a round trip, as a cross-region S3 link does. In one command, alternating runs:

    python3 benches/download.py [--size-mib 2048] [--rate-mib 25] [--delay-ms 40] [--runs 3]

Rows: a lifeboat restore with 8 ranged GETs in flight (the default), with 1 (one GET
stream, as before ranged downloads) and with 10 (as many as `aws s3 cp` uses), a lifeboat verify with 8 and with 1 (the same reads and
checksums, nothing extracted), and `aws s3 cp` of the same object to a file (it also downloads in
parallel, 10 ranges of 8 MiB). Prints median wall time, peak RSS, every run, and the ratios:
  restore, 8 ranges vs 1           target >= 6x faster
  restore, 8 ranges vs aws s3 cp   target >= 0.9x its speed
The backup itself goes to the region directly; only the reads cross the proxy.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, require  # noqa: E402
from postgres import DATA  # noqa: E402
from regions import ACCESS_KEY, SECRET_KEY, Region  # noqa: E402

WORK = DATA.parent / "download"


class ThrottlingProxy:
    """TCP proxy on loopback: each connection's answers flow at `rate` bytes/s at most, and a
    request that follows a quiet moment on its connection waits `delay` s before it goes on."""

    def __init__(self, upstream, rate, delay):
        self.upstream = upstream
        self.rate = rate
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.upstream)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self.answers, args=(server, client), daemon=True).start()

    def requests(self, source, sink):
        quiet_since = 0.0

        def before(_):
            nonlocal quiet_since
            # A new request (not the rest of a body): one round trip before it arrives.
            if time.monotonic() - quiet_since > 0.005:
                time.sleep(self.delay)

        def after(_):
            nonlocal quiet_since
            quiet_since = time.monotonic()

        self.relay(source, sink, before, after)

    def answers(self, source, sink):
        allowed_at = time.monotonic()

        def after(sent):
            nonlocal allowed_at
            now = time.monotonic()
            allowed_at = max(allowed_at, now) + sent / self.rate
            if allowed_at > now:
                time.sleep(allowed_at - now)

        self.relay(source, sink, lambda _: None, after)

    @staticmethod
    def relay(source, sink, before, after):
        """Moves bytes from source to sink through a pipe (splice: no copy through Python),
        calling before(n) and after(n) around each piece."""
        pipe_out, pipe_in = os.pipe()
        try:
            while (n := os.splice(source.fileno(), pipe_in, 1 << 18)) > 0:
                before(n)
                left = n
                while left:
                    left -= os.splice(pipe_out, sink.fileno(), left)
                after(n)
        except OSError:
            pass
        finally:
            os.close(pipe_out)
            os.close(pipe_in)
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def timed(argv, env):
    """(wall s, peak RSS MiB, CPU s) from GNU time."""
    out = subprocess.run(["/usr/bin/time", "-f", "BENCH %e %M %U %S", *argv], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, argv))}\n{out.stdout}{out.stderr}")
    wall, rss, user, system = [l for l in out.stderr.splitlines()
                               if l.startswith("BENCH ")][-1].split()[1:]
    return float(wall), int(rss) / 1024, float(user) + float(system)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--rate-mib", type=float, default=25)
    parser.add_argument("--delay-ms", type=float, default=40)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", action="append", default=[],
                        help="only the rows whose label contains this (repeatable); no ratios")
    args = parser.parse_args()
    require("aws", "/usr/bin/time")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    region = Region("a", WORK)
    env = dict(os.environ, LIFEBOAT_LOG="error", AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    try:
        source = WORK / "source"
        source.mkdir()
        with open(source / "data.bin", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        job = f'[[job]]\nname = "bench"\nkind = "files"\npaths = ["{source}"]\n'
        direct = WORK / "direct.toml"
        direct.write_text(region.repository() + job)
        subprocess.run([LIFEBOAT, "-q", "--config", direct, "backup", "bench"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        host, port = region.endpoint.removeprefix("http://").split(":")
        proxy = ThrottlingProxy((host, int(port)), args.rate_mib * (1 << 20), args.delay_ms / 1000)
        key = subprocess.run(
            ["aws", "--endpoint-url", region.endpoint, "s3", "ls", "--recursive", "s3://bench/lifeboat/"],
            env=env, capture_output=True, text=True, check=True).stdout
        key = next(line.split()[-1] for line in key.splitlines() if line.endswith(".tar.zst"))
        stored = int(subprocess.run(
            ["aws", "--endpoint-url", region.endpoint, "s3api", "head-object", "--bucket", "bench",
             "--key", key, "--query", "ContentLength"], env=env, capture_output=True, text=True,
            check=True).stdout)
        through = region.repository().replace(region.endpoint, proxy.endpoint)
        configs = {}
        for ranges in (8, 1, 10):
            config = WORK / f"ranges-{ranges}.toml"
            config.write_text(through.replace("path_style = true\n",
                                              f"path_style = true\ndownload_concurrency = {ranges}\n") + job)
            configs[f"lifeboat, {ranges} range(s) in flight"] = config
        into = WORK / "restored"
        copy = WORK / "copy.bin"
        verifies = {"lifeboat verify, 8 ranges (no extraction)": 8, "lifeboat verify, 1 range": 1}
        aws = "aws s3 cp (10 ranges of 8 MiB)"

        def run(label):
            shutil.rmtree(into, ignore_errors=True)
            copy.unlink(missing_ok=True)
            if label in configs:
                sample = timed([LIFEBOAT, "-q", "--config", configs[label], "restore", "bench",
                                "--into", into], env)
                restored = into / source.relative_to("/") / "data.bin"
                if restored.stat().st_size != args.size_mib << 20:
                    sys.exit(f"the restore of {label} is {restored.stat().st_size} bytes")
            elif label in verifies:
                config = configs[f"lifeboat, {verifies[label]} range(s) in flight"]
                sample = timed([LIFEBOAT, "-q", "--config", config, "verify", "bench"], env)
            else:
                sample = timed(["aws", "--endpoint-url", proxy.endpoint, "s3", "cp", "--quiet",
                                f"s3://bench/{key}", copy], env)
            return sample

        labels = [*configs, *verifies, aws]
        if args.only:
            labels = [label for label in labels if any(o in label for o in args.only)]
        samples = {label: [] for label in labels}
        for index in range(args.runs):
            for label in (labels if index % 2 == 0 else reversed(labels)):
                samples[label].append(run(label))
        print(f"restore of {stored >> 20} MiB stored (files, incompressible) through a proxy at "
              f"{args.rate_mib:g} MiB/s and {args.delay_ms:g} ms per connection, {args.runs} runs each")
        print(f"  {'':40} {'wall (median)':>14} {'MB/s':>7} {'peak RSS':>9} {'CPU':>6}   runs")
        medians = {}
        for label in labels:
            walls = [w for w, _, _ in samples[label]]
            medians[label] = statistics.median(walls)
            rss = max(r for _, r, _ in samples[label])
            cpu = statistics.median(c for _, _, c in samples[label])
            print(f"  {label:40} {medians[label]:13.2f}s {stored / 1e6 / medians[label]:7.1f} "
                  f"{rss:6.0f}MiB {cpu:5.1f}s   {', '.join(f'{w:.1f}' for w in walls)}")
        if args.only:
            return
        eight, one, ten, checked, checked_one, copied = (medians[label] for label in labels)
        print(f"  restore speed-up, 8 ranges vs 1: {one / eight:.2f}x (target >= 6)")
        print(f"  restore speed vs aws s3 cp: {copied / eight:.2f}x (target >= 0.9)")
        print(f"  restore speed vs aws s3 cp, both with 10 connections: {copied / ten:.2f}x")
        print(f"  verify speed-up, 8 ranges vs 1: {checked_one / checked:.2f}x (the reads alone)")
        print(f"  verify speed vs aws s3 cp: {copied / checked:.2f}x (the same reads and both "
              "checksums, nothing written)")
    finally:
        region.stop()
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
