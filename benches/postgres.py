#!/usr/bin/env python3
"""PostgreSQL logical backup and restore benchmark, against the shell pipelines an SRE would
write instead, on the same pgbench database, alternating runs, in one command:

    python3 benches/postgres.py [--scale 100] [--runs 3]

Sets up its own scratch cluster (initdb as `postgres` when run as root) under
target/bench/postgres, fills it with `pgbench -i -s SCALE` once (scale 100 is about 1.5 GB),
and prints median wall and CPU time, peak RSS, and the ratios:
  backup  lifeboat backup (local repository)
          vs `pg_dump -Fc -Z0 | zstd -T0 -3 | tee >(sha256sum) > file`   target <= 1.0
          vs `pg_dump -Fc -Z0 > /dev/null`                              target <= 1.15
  restore lifeboat restore --jobs 2 (download and verify the stored dump, decode it into
          pg_restore; indexes 2 at a time), and with --parallel-data (stage it decompressed)
          vs `pg_restore -j 2` from a local file                       target <= 1.1
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, ROOT, measure, print_table, ratio_line, require  # noqa: E402

DATA = ROOT / "target" / "bench" / "postgres"
PG_BIN = Path(os.environ.get("LIFEBOAT_BENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))


def as_owner(argv):
    return (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, scale, settings=(), name=None, fill=None):
        """settings: extra `name=value` server settings for this start; name: the cluster's
        directory under DATA (default cluster-sSCALE); fill(cluster): makes the database
        `bench` (default pgbench -i -s SCALE)."""
        self.dir = DATA / (name or f"cluster-s{scale}")
        self.port = free_port()
        fresh = not (self.dir / "data" / "PG_VERSION").exists()
        if fresh:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            if os.geteuid() == 0:
                shutil.chown(self.dir, "postgres", "postgres")
            subprocess.run(as_owner([str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]),
                           check=True, stdout=subprocess.DEVNULL)
        conf = self.dir / "data" / "postgresql.conf"
        socket_line = f"unix_socket_directories = '{self.dir}'\n"
        if socket_line not in conf.read_text():
            # Servers restored from this cluster's base backups start with its config.
            with open(conf, "a") as out:
                out.write(socket_line)
        log = open(self.dir / "postgres.log", "ab")
        self.proc = subprocess.Popen(as_owner([str(PG_BIN / "postgres"), "-D", str(self.dir / "data"),
                                               "-p", str(self.port), "-k", str(self.dir),
                                               "-c", "listen_addresses=127.0.0.1", "-c", "max_wal_size=4GB",
                                               "-c", "maintenance_work_mem=256MB"]
                                              + [arg for setting in settings for arg in ("-c", setting)]),
                                     stdout=log, stderr=log)
        for _ in range(300):
            if subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode == 0:
                break
            time.sleep(0.1)
        else:
            sys.exit(f"the benchmark cluster did not start; see {self.dir / 'postgres.log'}")
        if fresh or self.psql("select count(*) from pg_database where datname = 'bench'") != "1":
            if fill:
                print(f"filling the benchmark database in {self.dir.name} (once; kept in {self.dir})", flush=True)
                self.psql("drop database if exists bench")
                fill(self)
                return
            print(f"filling the benchmark database: pgbench -i -s {scale} (once; kept in {self.dir})", flush=True)
            self.psql("create database bench")
            subprocess.run([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1",
                            "-p", str(self.port), "-U", "postgres", "bench"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.psql("vacuum analyze", "bench")

    def dsn(self, database):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql, database="postgres"):
        out = subprocess.run([str(PG_BIN / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d",
                              self.dsn(database), "-c", sql], check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self):
        # Fast shutdown of the cluster this script started (runuser does not pass signals on).
        subprocess.run(as_owner([str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "stop", "-m", "fast"]),
                       check=False, stdout=subprocess.DEVNULL)
        self.proc.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["backup", "restore"], help="run one half of the benchmark")
    args = parser.parse_args()
    require("zstd", "sha256sum", "/usr/bin/time", str(PG_BIN / "pg_dump"))

    cluster = Cluster(args.scale)
    try:
        run(cluster, args)
    finally:
        cluster.stop()


def settle(cluster):
    """Checkpoints and flushes dirty pages before a timed run, so that one run's writeback
    (a restored database, its WAL) is not billed to the next, whichever tool that is."""
    cluster.psql("checkpoint")
    os.sync()


def run(cluster, args):
    size = int(cluster.psql("select pg_database_size('bench')"))
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo, staging, dump = work / "repo", work / "staging", work / "bench.dump"
    staging.mkdir()
    config = work / "lifeboat.toml"
    config.write_text(
        f'[compression]\nlevel = 3\n\n'
        f'[[repository]]\nname = "local"\ntype = "local"\npath = "{repo}"\n\n'
        f'[[job]]\nname = "bench"\nkind = "postgres"\ndsn = "{cluster.dsn("postgres")}"\ndatabases = ["bench"]\n'
    )
    env = dict(os.environ, LIFEBOAT_CONFIG=str(config), LIFEBOAT_LOG="error", PATH=f"{PG_BIN}:{os.environ['PATH']}")
    pg_dump = f"{PG_BIN}/pg_dump -Fc -Z0 -d '{cluster.dsn('bench')}'"
    backups = {
        "lifeboat backup bench (local repository)": ([str(LIFEBOAT), "backup", "bench"], False),
        "pg_dump -Fc -Z0 | zstd -T0 -3 | tee >(sha256sum) > f": (
            f"{pg_dump} | zstd -q -T0 -3 | tee >(sha256sum > /dev/null) > '{work}/pipeline.dump.zst'", True),
        "pg_dump -Fc -Z0 > /dev/null": (f"{pg_dump} > /dev/null", True),
    }
    samples = {label: [] for label in backups}
    for number in range(args.runs if args.only != "restore" else 0):
        shutil.rmtree(repo, ignore_errors=True)
        order = list(backups.items())
        if number % 2:
            order.reverse()
        for label, (argv, shell) in order:
            settle(cluster)
            samples[label].append(measure(argv, env, shell=shell))
    if args.only == "restore":
        subprocess.run([str(LIFEBOAT), "backup", "bench"], env=env, check=True, stdout=subprocess.DEVNULL)
    stored = sum(f.stat().st_size for f in repo.rglob("*.zst"))
    print(f"database 'bench': pgbench scale {args.scale}, {size / 2**20:.0f} MiB on disk; "
          f"lifeboat stored {stored / 2**20:.0f} MiB; {args.runs} runs each, alternating, cpus={os.cpu_count()}")
    if args.only != "restore":
        values = print_table("backup", [(label, samples[label]) for label in backups])
        lb = values["lifeboat backup bench (local repository)"]
        ratio_line("vs pg_dump | zstd | tee >(sha256sum)", lb,
                   values["pg_dump -Fc -Z0 | zstd -T0 -3 | tee >(sha256sum) > f"], 1.0)
        ratio_line("vs pg_dump > /dev/null", lb, values["pg_dump -Fc -Z0 > /dev/null"], 1.15)
    if args.only == "backup":
        return

    # Restore: the same backup into a new database each run.
    subprocess.run(["bash", "-c", f"{pg_dump} > '{dump}'"], check=True)
    restores = {"lifeboat restore --jobs 2": [], "lifeboat restore --jobs 2 --parallel-data": [],
                "pg_restore -j 2 (local file)": []}
    for number in range(args.runs):
        order = list(restores)
        if number % 2:
            order.reverse()
        for label in order:
            name = f"restore_{number}_{list(restores).index(label)}"
            cluster.psql(f"drop database if exists {name}")
            if label.startswith("lifeboat"):
                argv = [str(LIFEBOAT), "restore", "bench", "--target", cluster.dsn("postgres"), "--database",
                        "bench", "--as", name, "--jobs", "2", "--staging-dir", str(staging)]
                if "--parallel-data" in label:
                    argv.append("--parallel-data")
                settle(cluster)
                restores[label].append(measure(argv, env))
            else:
                cluster.psql(f"create database {name} template template0")
                argv = [str(PG_BIN / "pg_restore"), "-j", "2", "-d", cluster.dsn(name), str(dump)]
                settle(cluster)
                restores[label].append(measure(argv, env))
            cluster.psql(f"drop database {name}")
    values = print_table("restore", [(label, restores[label]) for label in restores])
    baseline = values["pg_restore -j 2 (local file)"]
    ratio_line("vs pg_restore -j 2", values["lifeboat restore --jobs 2"], baseline, 1.1)
    ratio_line("--parallel-data vs pg_restore -j 2", values["lifeboat restore --jobs 2 --parallel-data"], baseline, 1.1)


if __name__ == "__main__":
    main()
