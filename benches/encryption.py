#!/usr/bin/env python3
"""What age encryption costs a backup: the same logical backup of the same database into a
local repository, with and without `[encryption]`, alternating runs, in one command:

    python3 benches/encryption.py [--scale 50] [--random-mib 256] [--runs 5]

Sets up its own scratch cluster (see postgres.py) with pgbench data at SCALE plus a table of
RANDOM_MIB of random bytes: encryption works on the compressed stream, so data that does not
compress is its worst case. Prints median wall and CPU time, peak RSS, and the ratio
encrypted / unencrypted wall time (target <= 1.05).
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, measure, print_table, ratio_line, require  # noqa: E402
from postgres import DATA, PG_BIN, Cluster, settle  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--random-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    require("/usr/bin/time", str(PG_BIN / "pg_dump"))

    cluster = Cluster(args.scale)
    try:
        run(cluster, args)
    finally:
        cluster.stop()


def run(cluster, args):
    rows = args.random_mib * 2**20 // 1024
    cluster.psql("drop table if exists random_blobs", database="bench")
    cluster.psql("create table random_blobs (id int, payload bytea)", database="bench")
    # 1 KiB of random bytes per row: 32 md5 digests.
    cluster.psql(
        "insert into random_blobs select i, (select string_agg(decode(md5(random()::text || i || j), 'hex'), ''::bytea) "
        f"from generate_series(1, 64) j) from generate_series(1, {rows}) i",
        database="bench",
    )
    size = int(cluster.psql("select pg_database_size('bench')"))
    work = DATA / "encryption"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key = work / "key.txt"
    recipient = subprocess.run([str(LIFEBOAT), "keygen", "--output", str(key)], check=True,
                               capture_output=True, text=True).stdout.strip()
    configs = {}
    for label, encryption in [("unencrypted", ""), ("encrypted (age)", f'[encryption]\nrecipients = ["{recipient}"]\n\n')]:
        repo = work / label.split()[0]
        config = work / f"{label.split()[0]}.toml"
        config.write_text(
            f"{encryption}[compression]\nlevel = 3\n\n"
            f'[[repository]]\nname = "local"\ntype = "local"\npath = "{repo}"\n\n'
            f'[[job]]\nname = "bench"\nkind = "postgres"\ndsn = "{cluster.dsn("postgres")}"\ndatabases = ["bench"]\n'
        )
        configs[label] = (config, repo)
    samples = {label: [] for label in configs}
    for number in range(args.runs):
        order = list(configs.items())
        if number % 2:
            order.reverse()
        for label, (config, repo) in order:
            shutil.rmtree(repo, ignore_errors=True)
            env = dict(os.environ, LIFEBOAT_CONFIG=str(config), LIFEBOAT_LOG="error",
                       PATH=f"{PG_BIN}:{os.environ['PATH']}")
            settle(cluster)
            samples[label].append(measure([str(LIFEBOAT), "backup", "bench"], env))
    stored = {label: sum(f.stat().st_size for f in repo.rglob("*") if f.is_file() and f.name != "manifest.json")
              for label, (_, repo) in configs.items()}
    print(f"database 'bench': pgbench scale {args.scale} + {args.random_mib} MiB of random bytes, "
          f"{size / 2**20:.0f} MiB on disk; stored {stored['unencrypted'] / 2**20:.0f} MiB unencrypted, "
          f"{stored['encrypted (age)'] / 2**20:.0f} MiB encrypted; {args.runs} runs each, alternating, "
          f"cpus={os.cpu_count()}")
    values = print_table("logical backup", [(label, samples[label]) for label in configs])
    ratio_line("encrypted / unencrypted", values["encrypted (age)"], values["unencrypted"], 1.05)


if __name__ == "__main__":
    main()
