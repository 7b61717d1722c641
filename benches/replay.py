#!/usr/bin/env python3
"""WAL replay of a physical restore from S3: how long PostgreSQL takes from start to promotion
when its restore_command is `lifeboat wal-fetch` with WAL prefetch, without it, and plain `cp`
from a local directory of the same segments, directly and through a proxy that delays every
request by a round trip, alternating runs, in one command:

    python3 benches/replay.py [--wal-mib 2048] [--delay-ms 50] [--runs 3]

Makes its own small cluster (target/bench/postgres/replay) archiving with `lifeboat wal-push`
into one SeaweedFS region and with `cp` into a local directory, takes a base backup, writes at
least --wal-mib of WAL after it, restores the base backup once, and then times, for each row,
a copy of that restored data directory started with `pg_ctl` until it is promoted (every row
replays the same segments; the base backup's download is not timed). Prints median wall,
every run, and the ratios:
  prefetch vs cp from a local directory              target <= 1.15
  prefetch vs no prefetch, directly and through the delay
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, require  # noqa: E402
from download import ThrottlingProxy  # noqa: E402
from postgres import DATA, PG_BIN, Cluster, as_owner, free_port  # noqa: E402
from regions import ACCESS_KEY, SECRET_KEY, WEED, Region  # noqa: E402

WORK = DATA.parent / "replay"


def chown_tree(path):
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--wal-mib", type=int, default=2048)
    parser.add_argument("--delay-ms", type=float, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    require("aws", str(WEED), str(PG_BIN / "pg_ctl"))

    shutil.rmtree(WORK, ignore_errors=True)
    shutil.rmtree(DATA / "replay", ignore_errors=True)
    (WORK / "segments").mkdir(parents=True)
    region = Region("a", WORK)
    env = dict(os.environ, LIFEBOAT_LOG="error", AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    os.environ.update(env)
    job = '[[job]]\nname = "bench"\nkind = "postgres"\nmode = "physical"\ndsn = "{dsn}"\n'
    config = WORK / "lifeboat.toml"
    archive_command = (f"{LIFEBOAT} --config {config} wal-push --job bench %p "
                       f"&& cp %p {WORK / 'segments'}/%f")
    cluster = None
    try:
        cluster = Cluster(1, ["archive_mode=on", f"archive_command={archive_command}",
                              "archive_timeout=0", "wal_level=replica", "max_wal_size=1GB"],
                          name="replay", fill=lambda c: c.psql("create database bench"))
        dsn = cluster.dsn("postgres")
        config.write_text(region.repository() + job.format(dsn=dsn))
        chown_tree(WORK)
        subprocess.run([LIFEBOAT, "-q", "--config", config, "backup", "bench"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        start = cluster.psql("select pg_current_wal_lsn()")
        cluster.psql("create table filler (id bigint, payload text)", "bench")
        written = 0
        batch = 0
        while written < args.wal_mib << 20:
            cluster.psql("insert into filler select i, repeat(md5(random()::text), 6) "
                         f"from generate_series({batch * 400000}, {batch * 400000 + 399999}) i",
                         "bench")
            batch += 1
            written = int(cluster.psql(
                f"select pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')::bigint"))
        rows = cluster.psql("select count(*) from filler", "bench")
        last = cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")
        cluster.psql("select pg_switch_wal()")
        for _ in range(6000):
            if cluster.psql("select last_archived_wal from pg_stat_archiver") >= last:
                break
            time.sleep(0.1)
        else:
            sys.exit("the cluster did not archive its WAL; see its postgres.log")
        cluster.stop()
        cluster = None
        segments = len(list((WORK / "segments").glob("?" * 24)))

        template = WORK / "template"
        subprocess.run([LIFEBOAT, "-q", "--config", config, "restore", "bench", "--data-dir",
                        template], env=env, check=True, stdout=subprocess.DEVNULL)

        host, port = region.endpoint.removeprefix("http://").split(":")
        proxy = ThrottlingProxy((host, int(port)), 10 << 30, args.delay_ms / 1000)
        configs = {}
        for name, endpoint, depth in (("direct-prefetch", region.endpoint, 8),
                                      ("direct-none", region.endpoint, 0),
                                      ("delayed-prefetch", proxy.endpoint, 8),
                                      ("delayed-none", proxy.endpoint, 0)):
            path = WORK / f"{name}.toml"
            path.write_text(region.repository().replace(region.endpoint, endpoint)
                            + job.format(dsn=dsn) + f"wal_prefetch = {depth}\n")
            configs[name] = path
        chown_tree(WORK)

        def fetch_with(config_path):
            return (f"{LIFEBOAT} --config {config_path} wal-fetch --job bench %f %p",
                    f"{LIFEBOAT} wal-prefetch --clear --spool pg_wal/.lifeboat-prefetch")

        rows_by_label = {
            "wal-fetch, prefetch 8": fetch_with(configs["direct-prefetch"]),
            "wal-fetch, no prefetch": fetch_with(configs["direct-none"]),
            f"wal-fetch, prefetch 8, +{args.delay_ms:g} ms": fetch_with(configs["delayed-prefetch"]),
            f"wal-fetch, no prefetch, +{args.delay_ms:g} ms": fetch_with(configs["delayed-none"]),
            "cp from a local directory": (f"cp {WORK / 'segments'}/%f %p", ""),
        }

        def run(label):
            restore_command, end_command = rows_by_label[label]
            data = WORK / "data"
            shutil.rmtree(data, ignore_errors=True)
            subprocess.run(["cp", "-a", str(template), str(data)], check=True)
            auto = data / "postgresql.auto.conf"
            kept = [line for line in auto.read_text().splitlines()
                    if not line.startswith(("restore_command", "recovery_end_command"))]
            kept.append(f"restore_command = '{restore_command}'")
            kept.append(f"recovery_end_command = '{end_command}'")
            auto.write_text("\n".join(kept) + "\n")
            chown_tree(data)
            os.sync()
            port = free_port()
            started = time.monotonic()
            subprocess.run(as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(WORK / "server.log"),
                                     "-o", f"-p {port} -k {WORK} -c listen_addresses=127.0.0.1",
                                     "-W", "start"]), check=True, stdout=subprocess.DEVNULL, env=env)
            try:
                while True:
                    out = subprocess.run([str(PG_BIN / "psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(port),
                                          "-U", "postgres", "-d", "bench", "-c",
                                          "select pg_is_in_recovery()"],
                                         capture_output=True, text=True)
                    if out.stdout.strip() == "f":
                        break
                    if time.monotonic() - started > 1200:
                        sys.exit(f"{label}: not promoted after 20 minutes; see {WORK / 'server.log'}")
                    time.sleep(0.05)
                wall = time.monotonic() - started
                count = subprocess.run([str(PG_BIN / "psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(port),
                                        "-U", "postgres", "-d", "bench", "-c", "select count(*) from filler"],
                                       capture_output=True, text=True, check=True).stdout.strip()
                if count != rows:
                    sys.exit(f"{label}: {count} rows after replay, the source had {rows}")
                if (data / "pg_wal" / ".lifeboat-prefetch").exists():
                    sys.exit(f"{label}: the prefetch spool is still there after recovery")
            finally:
                subprocess.run(as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate"]),
                               check=False, stdout=subprocess.DEVNULL)
            return wall

        labels = list(rows_by_label)
        samples = {label: [] for label in labels}
        for index in range(args.runs):
            for label in (labels if index % 2 == 0 else reversed(labels)):
                samples[label].append(run(label))
        print(f"replay of {written / 2**20:.0f} MiB of WAL ({segments} segments) from one SeaweedFS "
              f"region, from start to promotion, {args.runs} runs each, alternating")
        medians = {}
        for label in labels:
            medians[label] = sorted(samples[label])[len(samples[label]) // 2]
            print(f"  {label:40} {medians[label]:8.2f}s   {', '.join(f'{w:.1f}' for w in samples[label])}")
        on, off, on_delayed, off_delayed, cp = (medians[label] for label in labels)
        print(f"  prefetch vs cp from a local directory: {on / cp:.2f}x (target <= 1.15)")
        print(f"  no prefetch vs cp: {off / cp:.2f}x")
        print(f"  with {args.delay_ms:g} ms per request: prefetch vs cp {on_delayed / cp:.2f}x, "
              f"no prefetch vs cp {off_delayed / cp:.2f}x")
    finally:
        if cluster:
            cluster.stop()
        region.stop()
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
