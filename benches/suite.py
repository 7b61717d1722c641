#!/usr/bin/env python3
"""lifeboat beside the tools an SRE would pick instead, on the same data in the same run:

    python3 benches/suite.py                       # everything (about an hour on 2 cores)
    python3 benches/suite.py --only pairs --datasets realistic --runs 3
    python3 benches/suite.py --only scale --scales 10,100,300
    python3 benches/suite.py --only list --backups 10000

It sets up its own data under target/bench (kept between runs, made once): a PostgreSQL
cluster per dataset, a config tree, a redis-server, two SeaweedFS "regions" on loopback.
Each pair runs alternately RUNS times (checkpoint and sync before each timed run); the
table shows median wall time, median CPU time (user + system, children included), the peak
RSS of the largest process, the output size, and the ratio lifeboat / alternative of the
wall times.

Datasets: `pgbench` (pgbench -i -s SCALE; compresses 60-100x, flattering every compressor)
and `realistic` (random text, numerics, timestamps and bytea at 3-5x with zstd -3).

Sections (--only): pairs (every row of the table, per dataset), verify (1.5 GB of stored
objects), scale (peak RSS and wall of a logical backup at pgbench scales 10, 100, 300),
list (`list` and `status` with 10,000 backups in a SeaweedFS repository).
"""

import argparse
import datetime
import hashlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
from benchlib import LIFEBOAT, ROOT, require  # noqa: E402
from postgres import PG_BIN, Cluster, as_owner, free_port  # noqa: E402
import redis  # noqa: E402
from regions import ACCESS_KEY, SECRET_KEY, WEED, Region  # noqa: E402

WORK = ROOT / "target" / "bench" / "suite"
ENV = dict(os.environ, LIFEBOAT_LOG="error", AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
           AWS_DEFAULT_REGION="us-east-1", PATH=f"{PG_BIN}:{os.environ['PATH']}")


# --- measuring -------------------------------------------------------------------------------

def timed(argv, shell=False, user=None, check=True):
    """Runs argv under GNU time; returns (wall s, cpu s, peak RSS MiB). Wall time is taken
    here with a monotonic clock (GNU time's is in 10 ms steps); CPU and RSS from GNU time,
    which counts the children the command waited for."""
    if shell:
        argv = ["bash", "-c", argv]
    argv = ["/usr/bin/time", "-f", "BENCH %U %S %M"] + [str(a) for a in argv]
    if user:
        argv = as_owner(argv)
    started = time.perf_counter()
    proc = subprocess.run(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if check and proc.returncode != 0:
        sys.exit(f"benchmark command failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    user_s, system_s, rss = [l for l in proc.stderr.splitlines() if l.startswith("BENCH ")][-1].split()[1:]
    return wall, float(user_s) + float(system_s), int(rss) / 1024


class Side:
    """One side of a pair: `prepare` and `finish` run untimed before and after each run;
    `size` says how big its output is, after the last run. Each run is printed as it ends
    unless `each` is False."""

    def __init__(self, label, argv, shell=False, user=None, prepare=None, finish=None, size=None, each=True):
        self.label, self.argv, self.shell, self.user = label, argv, shell, user
        self.prepare, self.finish, self.size, self.each = prepare, finish, size, each
        self.samples = []

    def run(self):
        if self.prepare:
            self.prepare()
        argv = self.argv() if callable(self.argv) else self.argv
        self.samples.append(timed(argv, self.shell, self.user))
        if self.each:
            wall, cpu, rss = self.samples[-1]
            print(f"    {wall:6.2f} s wall {cpu:6.2f} s CPU {rss:4.0f} MiB  {self.label}", flush=True)
        if self.finish:
            self.finish()


class Results:
    def __init__(self):
        self.rows = []

    def pair(self, dataset, what, lifeboat, alternative, runs, settle=None):
        for number in range(runs):
            for side in (lifeboat, alternative) if number % 2 == 0 else (alternative, lifeboat):
                if settle:
                    settle()
                else:
                    os.sync()
                side.run()
        self.add(dataset, what, lifeboat, alternative)

    def add(self, dataset, what, lifeboat, alternative, figures=None):
        figures = figures or (median_of(lifeboat.samples), median_of(alternative.samples))
        sizes = tuple(side.size() if side.size else None for side in (lifeboat, alternative))
        row = (dataset, what, lifeboat.label, alternative.label, figures, sizes)
        self.rows.append(row)
        print_row(row, flush=True)

    def table(self):
        print()
        print("| data | what | lifeboat | alternative | wall lifeboat | wall alt. | ratio | CPU lifeboat | CPU alt. "
              "| peak RSS lifeboat | peak RSS alt. | size lifeboat | size alt. |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in self.rows:
            print_row(row)


def median_of(samples):
    walls, cpus, rss = zip(*samples)
    return statistics.median(walls), statistics.median(cpus), max(rss)


def human(size):
    if size is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def seconds(value):
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def print_row(row, flush=False):
    dataset, what, lifeboat, alternative, (lb, alt), (lb_size, alt_size) = row
    print(f"| {dataset} | {what} | `{lifeboat}` | `{alternative}` | {seconds(lb[0])} | {seconds(alt[0])} "
          f"| **{lb[0] / alt[0]:.2f}** | {seconds(lb[1])} | {seconds(alt[1])} | {lb[2]:.0f} MiB | {alt[2]:.0f} MiB "
          f"| {human(lb_size)} | {human(alt_size)} |", flush=flush)


def tree_size(path, pattern="*"):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def newest_backup(repo, job):
    backups = sorted((repo / "jobs" / job / "backups").iterdir())
    return backups[-1]


def stored_size(repo, job):
    return lambda: sum(p.stat().st_size for p in newest_backup(repo, job).iterdir() if p.name != "manifest.json")


def give_to_postgres(path):
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


def fresh_dir(path, owner=False):
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if owner:
        give_to_postgres(path)
    return path


def lifeboat_config(path, repositories, job):
    path.write_text("[compression]\nlevel = 3\n\n" + "".join(repositories) + job)
    return path


def local_repository(name, path):
    return f'[[repository]]\nname = "{name}"\ntype = "local"\npath = "{path}"\n\n'


# --- the pairs -------------------------------------------------------------------------------

def dataset_cluster(dataset, args, settings=()):
    if dataset == "pgbench":
        cluster = Cluster(args.scale, settings, name=f"pgbench-s{args.scale}")
    else:
        cluster = Cluster(0, settings, name=f"realistic-{args.realistic_mib}",
                          fill=lambda cluster: datasets.fill_realistic(cluster, args.realistic_mib))
    # The first timed run should not be the only one reading the tables from disk.
    read_tree(cluster.dir / "data")
    return cluster


def read_tree(tree):
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass


def settle_cluster(cluster):
    def settle():
        cluster.psql("checkpoint")
        os.sync()
    return settle


def settle_tree(tree):
    """Reads every file of `tree` before each run, so neither side is the one that pays for
    reading it from disk after the section before evicted it."""
    def settle():
        os.sync()
        read_tree(tree)
    return settle


def logical_pairs(dataset, args, results, regions):
    work = fresh_dir(WORK / dataset / "logical")
    cluster = dataset_cluster(dataset, args)
    try:
        size = int(cluster.psql("select pg_database_size('bench')"))
        print(f"\n{dataset}: database 'bench' {size / 2**20:.0f} MiB on disk", flush=True)
        settle = settle_cluster(cluster)
        job = (f'[[job]]\nname = "bench"\nkind = "postgres"\ndsn = "{cluster.dsn("postgres")}"\n'
               f'databases = ["bench"]\n')
        repo = work / "repo"
        local = lifeboat_config(work / "local.toml", [local_repository("local", repo)], job)
        pg_dump = f"{PG_BIN}/pg_dump -Fc -Z0 -d '{cluster.dsn('bench')}'"
        pipeline = f"{pg_dump} | zstd -q -T0 -3 | tee >(sha256sum > /dev/null)"
        results.pair(dataset, "logical backup", Side(
            "lifeboat backup (local repository)", [LIFEBOAT, "--config", local, "backup", "bench"],
            prepare=lambda: shutil.rmtree(repo, ignore_errors=True), size=stored_size(repo, "bench")), Side(
            "pg_dump -Fc -Z0 | zstd -T0 -3 | tee >(sha256sum) > f", f"{pipeline} > '{work}/bench.dump.zst'",
            shell=True, size=lambda: tree_size(work / "bench.dump.zst")), args.runs, settle)

        two = lifeboat_config(work / "regions.toml", [r.repository() for r in regions], job)
        fifo = work / "region-a.fifo"
        # One pg_dump and one zstd feed both uploads; the first reads a fifo, waited for.
        uploads = (f"set -o pipefail; rm -f '{fifo}'; mkfifo '{fifo}'; "
                   f"aws --endpoint-url {regions[0].endpoint} s3 cp - s3://bench/pipeline/bench.dump.zst < '{fifo}' & "
                   f"first=$!; {pipeline} | tee '{fifo}' | aws --endpoint-url {regions[1].endpoint} s3 cp - "
                   f"s3://bench/pipeline/bench.dump.zst && wait $first")
        results.pair(dataset, "logical backup to 2 S3 regions", Side(
            "lifeboat backup (2 SeaweedFS regions)", [LIFEBOAT, "--config", two, "backup", "bench"],
            size=stored_size(repo, "bench")), Side(
            "pg_dump | zstd | tee >(sha256sum) | aws s3 cp - (x2)", uploads, shell=True,
            size=lambda: tree_size(work / "bench.dump.zst")), args.runs, settle)

        dump = work / "bench.dump"
        subprocess.run(["bash", "-c", f"{pg_dump} > '{dump}'"], check=True)
        staging = fresh_dir(work / "staging")
        names = iter(range(10**6))

        def fresh_database(create):
            def prepare():
                name = f"restored_{next(names)}"
                cluster.psql(f"drop database if exists {name}")
                if create:
                    cluster.psql(f"create database {name} template template0")
                restore_target["name"] = name
            return prepare

        def drop_database():
            restored_size["bytes"] = int(cluster.psql(f"select pg_database_size('{restore_target['name']}')"))
            cluster.psql(f"drop database {restore_target['name']}")

        restore_target, restored_size = {}, {}

        def lifeboat_restore(*extra):
            return Side(f"lifeboat restore --jobs 2{''.join(' ' + e for e in extra)}", lambda: [
                LIFEBOAT, "--config", local, "restore", "bench", "--target", cluster.dsn("postgres"), "--database",
                "bench", "--as", restore_target["name"], "--jobs", "2", *extra, "--staging-dir", staging],
                prepare=fresh_database(False), finish=drop_database, size=lambda: restored_size["bytes"])

        def pg_restore_local():
            return Side("pg_restore -j 2 (local file)", lambda: [
                PG_BIN / "pg_restore", "-j", "2", "-d", cluster.dsn(restore_target["name"]), dump],
                prepare=fresh_database(True), finish=drop_database, size=lambda: restored_size["bytes"])

        results.pair(dataset, "logical restore", lifeboat_restore(), pg_restore_local(), args.runs, settle)
        # What lifeboat does before pg_restore, by hand: check the stored copy, decompress it.
        stored_dump = next(newest_backup(repo, "bench").glob("bench.dump.zst"))
        by_hand = (f"sha256sum '{stored_dump}' > /dev/null && zstd -q -d -f '{stored_dump}' -o '{work}/by-hand.dump' "
                   f"&& {PG_BIN}/pg_restore -j 2 -d '{{dsn}}' '{work}/by-hand.dump'")
        results.pair(dataset, "logical restore, the same steps by hand", lifeboat_restore(), Side(
            "sha256sum f.zst && zstd -d f.zst && pg_restore -j 2 f",
            lambda: by_hand.format(dsn=cluster.dsn(restore_target["name"])), shell=True,
            prepare=fresh_database(True), finish=drop_database, size=lambda: restored_size["bytes"]),
            args.runs, settle)
        results.pair(dataset, "logical restore, staged decompressed", lifeboat_restore("--parallel-data"),
                     pg_restore_local(), args.runs, settle)
        dump.unlink()
        (work / "by-hand.dump").unlink()
    finally:
        cluster.stop()


def physical_pairs(dataset, args, results, _regions):
    work = fresh_dir(WORK / dataset / "physical")
    repo, pgbr_repo = work / "repo", work / "pgbackrest"
    config = work / "lifeboat.toml"
    pgbr_conf = work / "pgbackrest.conf"
    archive = (f"{LIFEBOAT} --config {config} wal-push --job bench %p && "
               f"pgbackrest --config={pgbr_conf} --stanza=bench archive-push %p")
    cluster = dataset_cluster(dataset, args, ["archive_mode=on", f"archive_command={archive}", "archive_timeout=0",
                                               "wal_level=replica"])
    try:
        lifeboat_config(config, [local_repository("local", repo)],
                        f'[[job]]\nname = "bench"\nkind = "postgres"\nmode = "physical"\n'
                        f'dsn = "{cluster.dsn("postgres")}"\n')
        pgbr_conf.write_text(
            f"[global]\nrepo1-path={pgbr_repo}\nlock-path={work / 'pgbackrest-lock'}\nrepo1-retention-full=100\n"
            "compress-type=zst\ncompress-level=3\nprocess-max=2\nstart-fast=y\nlog-level-console=warn\n"
            f"log-level-file=off\n\n[bench]\npg1-path={cluster.dir / 'data'}\npg1-port={cluster.port}\n"
            f"pg1-socket-path={cluster.dir}\n")
        give_to_postgres(work)
        pgbackrest = ["pgbackrest", f"--config={pgbr_conf}", "--stanza=bench"]
        subprocess.run(as_owner(pgbackrest + ["stanza-create"]), check=True, stdout=subprocess.DEVNULL)
        settle = settle_cluster(cluster)
        results.pair(dataset, "physical backup", Side(
            "lifeboat backup (physical, local repository)", [LIFEBOAT, "--config", config, "backup", "bench"],
            user="postgres", size=stored_size(repo, "bench")), Side(
            "pgbackrest --type=full backup (zst, process-max=2)", pgbackrest + ["--type=full", "backup"],
            user="postgres", size=lambda: tree_size(sorted((pgbr_repo / "backup" / "bench").glob("*F"))[-1])),
            args.runs, settle)

        # WAL to replay: churn after the last base backups, then a recovery target after it.
        churn_mib = args.replay_mib
        cluster.psql("drop table if exists churn; create table churn (id bigint, filler text)", "bench")
        start = cluster.psql("select pg_current_wal_lsn()")
        while int(cluster.psql(f"select pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')")) < churn_mib * 2**20:
            cluster.psql("insert into churn select g, md5(g::text) || md5(random()::text) "
                         "from generate_series(1, 200000) g; delete from churn where id % 2 = 0", "bench")
        # One moment, in each tool's format.
        moment = cluster.psql("select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS')")
        target, pgbr_target = moment.replace(" ", "T") + "Z", moment + "+00"
        time.sleep(1)
        cluster.psql("insert into churn values (-1, 'after the target')", "bench")
        last = cluster.psql("select pg_walfile_name(pg_switch_wal())")
        for _ in range(1200):
            if cluster.psql("select last_archived_wal from pg_stat_archiver") >= last:
                break
            time.sleep(0.1)
        else:
            sys.exit(f"the archiver did not archive {last}; see {cluster.dir / 'postgres.log'}")
        print(f"  replay: {churn_mib} MiB of WAL after the base backups, target {target}", flush=True)

        restored = work / "restored"
        port = free_port()
        restored_bytes = {}

        def empty_data_dir():
            fresh_dir(restored, owner=True)
            restored.chmod(0o700)

        def stop_restored():
            restored_bytes["size"] = tree_size(restored) - tree_size(restored / "pg_wal")
            subprocess.run(as_owner([PG_BIN / "pg_ctl", "-D", restored, "stop", "-m", "immediate"]),
                           stdout=subprocess.DEVNULL, check=True)
            shutil.rmtree(restored)

        pgbr_restore = (
            f"pgbackrest --config={pgbr_conf} --stanza=bench --pg1-path={restored} --type=time '--target={pgbr_target}' "
            f"--target-action=promote restore && {PG_BIN}/pg_ctl -D {restored} -o '-p {port}' -l {restored}/log "
            f"start -w -t 100000 > /dev/null && until {PG_BIN}/pg_controldata {restored} | "
            "grep -q 'in production'; do sleep 0.2; done")
        results.pair(dataset, "physical restore + replay", Side(
            "lifeboat restore --to-time T --start", [
                LIFEBOAT, "--config", config, "restore", "bench", "--data-dir", restored, "--to-time", target,
                "--start", "--port", port], user="postgres", prepare=empty_data_dir, finish=stop_restored,
            size=lambda: restored_bytes["size"]), Side(
            "pgbackrest restore --type=time + the same replay", pgbr_restore, shell=True, user="postgres",
            prepare=empty_data_dir, finish=stop_restored, size=lambda: restored_bytes["size"]), args.runs, settle)

        wal_push(dataset, args, results, cluster, work, repo)
    finally:
        # The dataset stays what it was for the next section and the next run.
        cluster.psql("drop table if exists churn", "bench")
        cluster.stop()


def wal_push(dataset, args, results, cluster, work, repo):
    """Real segments of this cluster (from lifeboat's archive, decompressed), pushed one
    process per segment as archive_command runs them, into fresh repositories: lifeboat and
    pgBackRest alternately, segment by segment."""
    segments = fresh_dir(work / "segments")
    archived = sorted((repo / "jobs" / "bench" / "wal").rglob("*.zst"))[-args.segments:]
    for source in archived:
        subprocess.run(["zstd", "-q", "-d", source, "-o", segments / source.name.removesuffix(".zst")], check=True)
    config = lifeboat_config(work / "walbench.toml", [local_repository("local", work / "walrepo")],
                             f'[[job]]\nname = "bench"\nkind = "postgres"\nmode = "physical"\n'
                             f'dsn = "{cluster.dsn("postgres")}"\n')
    pgbr_conf = work / "pgbackrest-wal.conf"
    pgbr_conf.write_text((work / "pgbackrest.conf").read_text().replace(str(work / "pgbackrest"),
                                                                         str(work / "pgbackrest-wal")))
    give_to_postgres(work)
    subprocess.run(as_owner(["pgbackrest", f"--config={pgbr_conf}", "--stanza=bench", "stanza-create"]), check=True,
                   stdout=subprocess.DEVNULL)
    lifeboat = Side("lifeboat wal-push (local repository)", None, user="postgres",
                    size=lambda: tree_size(work / "walrepo", "*.zst"), each=False)
    pgbackrest = Side("pgbackrest archive-push (zst)", None, user="postgres",
                      size=lambda: tree_size(work / "pgbackrest-wal" / "archive"), each=False)
    for number, segment in enumerate(sorted(segments.iterdir())):
        lifeboat.argv = [LIFEBOAT, "--config", config, "wal-push", "--job", "bench", segment]
        pgbackrest.argv = ["pgbackrest", f"--config={pgbr_conf}", "--stanza=bench", "archive-push", segment]
        for side in (lifeboat, pgbackrest) if number % 2 == 0 else (pgbackrest, lifeboat):
            side.run()
    count = len(lifeboat.samples)
    results.add(dataset, f"WAL push, median of {count} segments", lifeboat, pgbackrest)
    p99 = [tuple(percentile([s[i] for s in side.samples], 0.99) for i in range(3)) for side in (lifeboat, pgbackrest)]
    results.add(dataset, f"WAL push, p99 of {count} segments", lifeboat, pgbackrest, figures=p99)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def config_pair(dataset, args, results, _regions):
    tree = datasets.config_tree(ROOT / "target" / "bench" / "config-trees" / f"{dataset}-{args.config_mib}",
                                dataset, args.config_mib)
    work = fresh_dir(WORK / dataset / "config")
    repo = work / "repo"
    config = lifeboat_config(work / "lifeboat.toml", [local_repository("local", repo)],
                             f'[[job]]\nname = "config"\nkind = "files"\npaths = ["{tree}"]\n')
    files = sum(1 for p in tree.rglob("*") if p.is_file())
    print(f"\n{dataset}: config tree of {files} files, {tree_size(tree) / 2**20:.0f} MiB", flush=True)
    results.pair(dataset, f"config backup ({files} files)", Side(
        "lifeboat backup (files, local repository)", [LIFEBOAT, "--config", config, "backup", "config"],
        prepare=lambda: shutil.rmtree(repo, ignore_errors=True), size=stored_size(repo, "config")), Side(
        "tar -c | zstd -T0 -3 > f", f"tar -C '{tree.parent}' -cf - '{tree.name}' | zstd -q -T0 -3 > '{work}/tree.tar.zst'",
        shell=True, size=lambda: tree_size(work / "tree.tar.zst")), args.runs, settle_tree(tree))


def redis_pair(dataset, args, results, _regions):
    work = fresh_dir(WORK / dataset / "redis")
    server, port = redis.start_server(work)
    try:
        datasets.redis_fill(port, args.redis_keys, dataset)
        repo = work / "repo"
        config = lifeboat_config(work / "lifeboat.toml", [local_repository("local", repo)],
                                 f'[[job]]\nname = "redis"\nkind = "redis"\nurl = "redis://127.0.0.1:{port}"\n')
        rdb = work / "cli.rdb"
        print(f"\n{dataset}: redis with {args.redis_keys} keys", flush=True)
        results.pair(dataset, f"Redis backup ({args.redis_keys} keys)", Side(
            "lifeboat backup (redis, local repository)", [LIFEBOAT, "--config", config, "backup", "redis"],
            prepare=lambda: shutil.rmtree(repo, ignore_errors=True), size=stored_size(repo, "redis")), Side(
            "redis-cli --rdb f && zstd -T0 -3 f",
            f"redis-cli -p {port} --rdb '{rdb}' > /dev/null && zstd -q -f -T0 -3 '{rdb}' -o '{rdb}.zst'",
            shell=True, size=lambda: tree_size(work / "cli.rdb.zst")), args.runs)
    finally:
        server.terminate()
        server.wait()


def verify_pair(args, results):
    """verify re-reads every stored object and checks both its sha256 and, decompressed, the
    sha256 of what was backed up; the alternatives: sha256sum of the stored objects alone, and
    the same two checks by hand."""
    source = datasets.verify_files(ROOT / "target" / "bench" / f"verify-data-{args.verify_raw_mib}",
                                   args.verify_raw_mib)
    work = fresh_dir(WORK / "verify")
    repo = work / "repo"
    config = lifeboat_config(work / "lifeboat.toml", [local_repository("local", repo)],
                             f'[[job]]\nname = "data"\nkind = "files"\npaths = ["{source}"]\n')
    subprocess.run([LIFEBOAT, "--config", config, "backup", "data"], env=ENV, check=True, stdout=subprocess.DEVNULL)
    objects = " ".join(f"'{p}'" for p in sorted(newest_backup(repo, "data").glob("*.zst")))
    stored = tree_size(newest_backup(repo, "data"), "*.zst")
    print(f"\nverify: {stored / 2**30:.2f} GiB stored ({tree_size(source) / 2**30:.2f} GiB backed up)", flush=True)
    lifeboat = Side("lifeboat verify", [LIFEBOAT, "--config", config, "verify", "data"], size=lambda: stored)
    results.pair("realistic", "verify (stored sha256 + raw sha256)", lifeboat, Side(
        "sha256sum objects", f"sha256sum {objects}", shell=True, size=lambda: stored), args.runs)
    both = Side("sha256sum objects; zstd -dc objects | sha256sum", f"sha256sum {objects} & "
                f"zstd -q -dc {objects} | sha256sum; wait", shell=True, size=lambda: stored)
    for _ in range(args.runs):
        os.sync()
        both.run()
    results.add("realistic", "verify, alternative doing the same two checks", lifeboat, both)


def scale_section(args):
    """Peak RSS and wall time of a logical backup as the database grows."""
    print("\nlogical backup at pgbench scales " + ", ".join(map(str, args.scales)), flush=True)
    print("| pgbench scale | database | stored | wall | CPU | peak RSS | throughput |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rss = {}
    for scale in args.scales:
        work = fresh_dir(WORK / f"scale-{scale}")
        cluster = Cluster(scale, name=f"pgbench-s{scale}")
        try:
            repo = work / "repo"
            config = lifeboat_config(work / "lifeboat.toml", [local_repository("local", repo)],
                                     f'[[job]]\nname = "bench"\nkind = "postgres"\ndsn = "{cluster.dsn("postgres")}"\n'
                                     f'databases = ["bench"]\n')
            size = int(cluster.psql("select pg_database_size('bench')"))
            samples = []
            for _ in range(args.scale_runs):
                shutil.rmtree(repo, ignore_errors=True)
                settle_cluster(cluster)()
                samples.append(timed([LIFEBOAT, "--config", config, "backup", "bench"]))
            wall, cpu, peak = median_of(samples)
            rss[scale] = peak
            print(f"| {scale} | {human(size)} | {human(stored_size(repo, 'bench')())} | {seconds(wall)} "
                  f"| {seconds(cpu)} | {peak:.0f} MiB | {size / wall / 2**20:.0f} MiB/s |", flush=True)
        finally:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    low, high = rss[min(rss)], rss[max(rss)]
    verdict = "within" if high <= low * 1.10 else "OVER"
    print(f"peak RSS at scale {max(rss)} / scale {min(rss)}: {high / low:.2f}x (target <= 1.10: {verdict})")


def list_section(args):
    """A repository in SeaweedFS holding BACKUPS backups of a files job (made from one real
    backup: its object copied, its manifest re-dated and sealed again), then `list` and
    `status` against it."""
    work = fresh_dir(WORK / "list")
    region = Region("list", work)
    try:
        seed_repo = work / "seed"
        source = work / "etc"
        source.mkdir()
        (source / "app.conf").write_text("listen = 127.0.0.1:8080\n")
        seed = lifeboat_config(work / "seed.toml", [local_repository("seed", seed_repo)],
                               f'[[job]]\nname = "conf"\nkind = "files"\npaths = ["{source}"]\n')
        subprocess.run([LIFEBOAT, "--config", seed, "backup", "conf"], env=ENV, check=True, stdout=subprocess.DEVNULL)
        many = work / "many"
        many_backups(seed_repo, many, "conf", args.backups)
        aws_config = work / "aws.cfg"
        aws_config.write_text("[default]\ns3 =\n  max_concurrent_requests = 64\n  max_queue_size = 10000\n")
        print(f"\nlist: uploading {args.backups} backups to SeaweedFS", flush=True)
        subprocess.run(["aws", "--endpoint-url", region.endpoint, "s3", "sync", "--only-show-errors", many,
                        "s3://bench/lifeboat"], env=dict(ENV, AWS_CONFIG_FILE=str(aws_config)), check=True)
        config = lifeboat_config(work / "list.toml", [region.repository()],
                                 f'[[job]]\nname = "conf"\nkind = "files"\npaths = ["{source}"]\n')
        listed = subprocess.run([LIFEBOAT, "--config", config, "list", "conf"], env=ENV, check=True,
                                capture_output=True, text=True).stdout
        rows = sum(1 for line in listed.splitlines() if line.startswith("conf "))
        if rows != args.backups + 1:
            sys.exit(f"list shows {rows} backups, expected {args.backups + 1}")
        print(f"| command | backups | wall (median of {args.runs}) | CPU | peak RSS |")
        print("|---|---:|---:|---:|---:|")
        for command in (["list", "conf"], ["status", "conf"]):
            samples = [timed([LIFEBOAT, "--config", config, *command], check=command[0] == "list")
                       for _ in range(args.runs)]
            wall, cpu, peak = median_of(samples)
            print(f"| `lifeboat {' '.join(command)}` | {rows} | {seconds(wall)} | {seconds(cpu)} | {peak:.0f} MiB |",
                  flush=True)
    finally:
        region.stop()


def many_backups(seed_repo, root, job, count):
    """COUNT backups an hour apart, ending an hour before the seed backup."""
    shutil.copytree(seed_repo, root)
    seed = newest_backup(root, job)
    manifest = (seed / "manifest.json").read_text()
    seal = re.search(r'"manifest_sha256": "([0-9a-f]{64})"', manifest).group(1)
    unsealed = manifest.replace(seal, "0" * 64)
    stamps = sorted(set(re.findall(r'"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)"', manifest)))
    seed_time = datetime.datetime.strptime(seed.name, "%Y%m%dT%H%M%SZ")
    for number in range(1, count + 1):
        shift = datetime.timedelta(hours=number)
        backup_id = (seed_time - shift).strftime("%Y%m%dT%H%M%SZ")
        text = unsealed.replace(seed.name, backup_id)
        for stamp in stamps:
            at = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")) - shift
            text = text.replace(f'"{stamp}"', '"' + at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + '"')
        digest = hashlib.sha256(text.encode()).hexdigest()
        target = seed.parent / backup_id
        target.mkdir()
        for item in seed.iterdir():
            if item.name != "manifest.json":
                os.link(item, target / item.name)
        (target / "manifest.json").write_text(text.replace("0" * 64, digest))


PAIRS = {"logical": logical_pairs, "physical": physical_pairs, "config": config_pair, "redis": redis_pair}


# --- main ------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="pairs,verify,scale,list",
                        help="sections to run, comma-separated: pairs (that is logical, physical, config, "
                             "redis), verify, scale, list")
    parser.add_argument("--datasets", default=",".join(datasets.DATASETS))
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale of the pgbench dataset")
    parser.add_argument("--realistic-mib", type=int, default=750, help="size of the realistic database")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--replay-mib", type=int, default=512, help="WAL to replay after the base backup")
    parser.add_argument("--segments", type=int, default=30, help="WAL segments for the wal-push pair")
    parser.add_argument("--config-mib", type=int, default=100)
    parser.add_argument("--redis-keys", type=int, default=1_000_000)
    parser.add_argument("--verify-raw-mib", type=int, default=4608,
                        help="realistic text backed up for verify (stores about 1.5 GB)")
    parser.add_argument("--scales", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 300])
    parser.add_argument("--scale-runs", type=int, default=1)
    parser.add_argument("--backups", type=int, default=10_000, help="backups in the repository for list")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    if "pairs" in sections:
        sections |= set(PAIRS)
    require("zstd", "sha256sum", "tar", "/usr/bin/time", "aws", "pgbackrest", "redis-server", "redis-cli",
            str(WEED), str(PG_BIN / "pg_dump"), *(["runuser"] if os.geteuid() == 0 else []))

    results = Results()
    started = time.monotonic()
    print(f"lifeboat benchmark suite: {args.runs} runs per pair, alternating; cpus={os.cpu_count()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    regions = []
    try:
        if "logical" in sections:
            regions = [Region("a", fresh_dir(WORK / "regions")), Region("b", WORK / "regions")]
        for dataset in args.datasets.split(","):
            for section, run in PAIRS.items():
                if section in sections:
                    run(dataset, args, results, regions)
    finally:
        for region in regions:
            region.stop()
    if "verify" in sections:
        verify_pair(args, results)
    if results.rows:
        results.table()
    if "scale" in sections:
        scale_section(args)
    if "list" in sections:
        list_section(args)
    print(f"\nsuite done in {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    # SIGTERM unwinds like an error, so the servers started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
