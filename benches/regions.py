#!/usr/bin/env python3
"""Fan-out benchmark: the same PostgreSQL backup into one S3 region, into two, and into two
plus a local directory, alternating runs, in one command:

    python3 benches/regions.py [--scale 100] [--runs 3]

Uses the pgbench cluster of benches/postgres.py (made once under target/bench/postgres) and
starts two SeaweedFS servers (`weed mini`, from `bash .ci/setup`) on loopback ports, each
its own "region". Prints median wall and CPU time and peak RSS, and the ratios:
  2 regions vs 1 region, wall time                  target <= 1.25
  peak RSS with 3 repositories (2 regions + local)  target <= 160 MiB
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, ROOT, measure, print_table, ratio_line, require  # noqa: E402
from postgres import DATA, Cluster, settle  # noqa: E402

WEED = Path(os.environ.get("LIFEBOAT_TEST_WEED", ROOT / ".tools" / "seaweedfs" / "bin" / "weed"))
ACCESS_KEY, SECRET_KEY = "lifeboat-bench-key", "lifeboat-bench-secret"


def free_port_pair():
    """A port free on loopback whose gRPC twin (+10000) is free as well."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


class Region:
    def __init__(self, name, parent):
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"region-{name}-", dir=parent))
        (self.dir / "data").mkdir()
        identities = {"identities": [{"name": "admin", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.dir / "s3.json").write_text(json.dumps(identities))
        s3, master, volume, filer, admin = (free_port_pair() for _ in range(5))
        self.endpoint = f"http://127.0.0.1:{s3}"
        log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [str(WEED), "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
             f"-filer.port={filer}", f"-admin.port={admin}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-webdav=false", "-admin.ui=false", f"-s3.config={self.dir / 's3.json'}",
             f"-filer.localSocket={self.dir / 'filer.sock'}", f"-s3.localSocket={self.dir / 's3.sock'}"],
            stdout=log, stderr=log, env=dict(os.environ, TMPDIR=str(self.dir)))
        for _ in range(400):
            if self.aws("s3", "mb", "s3://bench", check=False).returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        sys.exit(f"SeaweedFS region {name} did not start; see {self.dir / 'weed.log'}")

    def aws(self, *args, check=True):
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION="us-east-1")
        return subprocess.run(["aws", "--endpoint-url", self.endpoint, *args], env=env, check=check,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def repository(self):
        return (f'[[repository]]\nname = "{self.name}"\ntype = "s3"\nbucket = "bench"\nprefix = "lifeboat"\n'
                f'region = "us-east-1"\nendpoint = "{self.endpoint}"\npath_style = true\n\n')

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    require("aws", "/usr/bin/time", str(WEED))

    work = DATA / "regions"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cluster = Cluster(args.scale)
    regions = []
    try:
        regions = [Region("a", work), Region("b", work)]
        run(cluster, regions, work, args)
    finally:
        for region in regions:
            region.stop()
        cluster.stop()


def run(cluster, regions, work, args):
    job = (f'[[job]]\nname = "bench"\nkind = "postgres"\ndsn = "{cluster.dsn("postgres")}"\n'
           f'databases = ["bench"]\n')
    local = f'[[repository]]\nname = "local"\ntype = "local"\npath = "{work / "repo"}"\n\n'
    setups = {
        "1 region (a)": regions[0].repository(),
        "2 regions (a, b)": regions[0].repository() + regions[1].repository(),
        "2 regions + local": regions[0].repository() + regions[1].repository() + local,
    }
    configs = {}
    for label, repositories in setups.items():
        path = work / f"lifeboat-{len(configs)}.toml"
        path.write_text("[compression]\nlevel = 3\n\n" + repositories + job)
        configs[label] = path
    env = dict(os.environ, LIFEBOAT_LOG="error", AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY, PATH=f"/usr/lib/postgresql/15/bin:{os.environ['PATH']}")
    samples = {label: [] for label in configs}
    for number in range(args.runs):
        order = list(configs.items())
        if number % 2:
            order.reverse()
        for label, path in order:
            settle(cluster)
            samples[label].append(measure([str(LIFEBOAT), "--config", str(path), "backup", "bench"], env))
    size = int(cluster.psql("select pg_database_size('bench')"))
    print(f"database 'bench': pgbench scale {args.scale}, {size / 2**20:.0f} MiB on disk; "
          f"{args.runs} runs each, alternating, cpus={os.cpu_count()}")
    values = print_table("backup", [(label, samples[label]) for label in configs])
    ratio_line("2 regions vs 1 region", values["2 regions (a, b)"], values["1 region (a)"], 1.25)
    rss = values["2 regions + local"][2]
    verdict = "within" if rss <= 160 else "OVER"
    print(f"  peak RSS with 3 repositories {rss:25.0f} MiB (target <= 160: {verdict})")


if __name__ == "__main__":
    main()
