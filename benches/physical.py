#!/usr/bin/env python3
"""Physical backups and WAL archiving, against what an SRE would run instead, on the same
cluster, alternating runs, in one command:

    python3 benches/physical.py [--scale 100] [--runs 3] [--segments 30] [--only base|wal-push]

Uses the pgbench cluster of benches/postgres.py (target/bench/postgres/cluster-sSCALE), started
with archive_mode = on and archive_command = `lifeboat wal-push`, and prints median wall and
CPU time, peak RSS and the ratios:
  base backup  lifeboat backup (physical job, local repository)
               vs `pg_basebackup -Ft -D - -X none -c fast | zstd -T0 -3 > file`   target <= 1.0
               vs pgBackRest full backup (posix repo, compress-type=zst, level 3,
                  process-max=2, start-fast)                                  target <= 1.0
  wal-push     per-segment latency (median, p95, max) of `lifeboat wal-push` over real
               16 MiB segments the cluster archived, into a local repository, into
               SeaweedFS and into both; beside it `zstd -T0 -3` of the same segment to a file.
               Median target <= 30 ms to a local repository; peak RSS <= 24 MiB.
Both pg_basebackup runs wait for the last segment to be archived by the same
archive_command; pgBackRest runs with archive-check=n, so it does not wait.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, measure, print_table, ratio_line, require  # noqa: E402
from postgres import DATA, PG_BIN, Cluster, as_owner, settle  # noqa: E402
from regions import ACCESS_KEY, SECRET_KEY, WEED, Region  # noqa: E402

WORK = DATA.parent / "physical"


def give_to_postgres(path):
    if os.geteuid() == 0:
        for root, dirs, files in os.walk(path):
            shutil.chown(root, "postgres", "postgres")
            for name in files:
                shutil.chown(os.path.join(root, name), "postgres", "postgres")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--segments", type=int, default=30)
    parser.add_argument("--only", choices=["base", "wal-push"], help="one part only")
    args = parser.parse_args()
    require("zstd", "pgbackrest", "aws", "/usr/bin/time", str(WEED), str(PG_BIN / "pg_basebackup"))

    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "repo").mkdir(parents=True)
    (WORK / "pgbackrest").mkdir()
    config = WORK / "lifeboat.toml"
    archive_command = f"{LIFEBOAT} --config {config} wal-push --job bench %p"
    cluster = Cluster(args.scale, ["archive_mode=on", f"archive_command={archive_command}",
                                   "archive_timeout=0", "wal_level=replica"])
    config.write_text(
        f'[compression]\nlevel = 3\n\n'
        f'[[repository]]\nname = "local"\ntype = "local"\npath = "{WORK / "repo"}"\n\n'
        f'[[job]]\nname = "bench"\nkind = "postgres"\nmode = "physical"\n'
        f'dsn = "{cluster.dsn("postgres")}"\n')
    give_to_postgres(WORK)
    regions = []
    try:
        if args.only != "wal-push":
            base_backups(cluster, config, args)
        if args.only != "base":
            regions = [Region("wal", WORK)]
            wal_push(cluster, config, regions[0], args)
    finally:
        for region in regions:
            region.stop()
        cluster.stop()


def base_backups(cluster, config, args):
    pgbackrest_conf = WORK / "pgbackrest.conf"
    pgbackrest_conf.write_text(
        "[global]\n"
        f"repo1-path={WORK / 'pgbackrest' / 'repo'}\n"
        f"lock-path={WORK / 'pgbackrest' / 'lock'}\n"
        "repo1-retention-full=100\ncompress-type=zst\ncompress-level=3\nprocess-max=2\n"
        "start-fast=y\narchive-check=n\nlog-level-console=warn\nlog-level-file=off\n\n"
        f"[bench]\npg1-path={cluster.dir / 'data'}\npg1-port={cluster.port}\npg1-socket-path={cluster.dir}\n")
    give_to_postgres(WORK)
    pgbackrest = ["pgbackrest", f"--config={pgbackrest_conf}", "--stanza=bench"]
    subprocess.run(as_owner(pgbackrest + ["stanza-create"]), check=True, stdout=subprocess.DEVNULL)

    env = dict(os.environ, LIFEBOAT_LOG="error")
    basebackup = (f"{PG_BIN}/pg_basebackup -d '{cluster.dsn('postgres')}' -Ft -D - -X none -c fast "
                  f"| zstd -q -T0 -3 > '{WORK}/base.tar.zst'")
    runs = {
        "lifeboat backup (physical, local repository)": (as_owner([str(LIFEBOAT), "--config", str(config),
                                                                    "backup", "bench"]), False),
        "pg_basebackup -Ft -D - | zstd -T0 -3 > f": (basebackup, True),
        "pgBackRest full (zst, process-max=2)": (as_owner(pgbackrest + ["--type=full", "backup"]), False),
    }
    samples = {label: [] for label in runs}
    for number in range(args.runs):
        order = list(runs.items())
        if number % 2:
            order.reverse()
        for label, (argv, shell) in order:
            settle(cluster)
            samples[label].append(measure(argv, env, shell=shell))
    size = int(cluster.psql("select sum(pg_database_size(oid)) from pg_database"))
    stored = sorted(p.stat().st_size for p in (WORK / "repo").rglob("base.tar.zst"))
    print(f"cluster: pgbench scale {args.scale}, {size / 2**20:.0f} MiB of databases; lifeboat stored "
          f"{stored[-1] / 2**20:.0f} MiB per base backup, pg_basebackup | zstd "
          f"{(WORK / 'base.tar.zst').stat().st_size / 2**20:.0f} MiB; {args.runs} runs each, alternating, "
          f"cpus={os.cpu_count()}")
    values = print_table("base backup", [(label, samples[label]) for label in runs])
    lifeboat = values["lifeboat backup (physical, local repository)"]
    ratio_line("vs pg_basebackup | zstd", lifeboat, values["pg_basebackup -Ft -D - | zstd -T0 -3 > f"], 1.0)
    ratio_line("vs pgBackRest full", lifeboat, values["pgBackRest full (zst, process-max=2)"], 1.0)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def wal_push(cluster, config, region, args):
    """Real segments the cluster archived (decompressed from the bench job's repository),
    pushed one process per segment as archive_command does, into a fresh job under their
    own names (wal-push refuses a segment whose header is not where its name says)."""
    segments_dir = WORK / "segments"
    segments_dir.mkdir()
    wal = WORK / "repo" / "jobs" / "bench" / "wal"

    def archived():
        return sorted(wal.glob("*/" + "?" * 24 + ".zst"))

    # Real WAL, as many segments as asked: rows of random-looking text written until the
    # cluster archived enough (about 100 MiB of WAL per round).
    cluster.psql("create table if not exists walfill (id bigint, note text)")
    while len(archived()) < args.segments + 2:
        cluster.psql("insert into walfill select g, md5(g::text) || md5((g + 1)::text) "
                     "from generate_series(1, 700000) g")
        cluster.psql("select pg_switch_wal()")
        time.sleep(1)
    cluster.psql("drop table walfill")
    cluster.psql("select pg_switch_wal()")
    time.sleep(2)
    archived = archived()
    for source in archived[-args.segments:]:
        subprocess.run(["zstd", "-q", "-d", "-f", str(source), "-o", str(segments_dir / source.stem)],
                       check=True)
    segments = sorted(segments_dir.iterdir())
    env = dict(os.environ, LIFEBOAT_LOG="error", AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    job = '[[job]]\nname = "walbench"\nkind = "postgres"\nmode = "physical"\ndsn = "postgresql://x@127.0.0.1/x"\n'
    local = f'[[repository]]\nname = "local"\ntype = "local"\npath = "{WORK / "walrepo"}"\n\n'
    targets = {
        "local repository": local,
        "SeaweedFS (S3 on loopback)": region.repository(),
        "local + SeaweedFS": local + region.repository(),
    }
    print(f"wal-push: {len(segments)} real 16 MiB segments the cluster archived, one process each")
    print(f"  {'':44} {'median':>10} {'p95':>10} {'max':>10} {'ratio':>8} {'peak RSS':>9}")
    baseline = []
    for segment in segments:
        started = time.perf_counter()
        subprocess.run(["zstd", "-q", "-f", "-T0", "-3", str(segment), "-o", str(WORK / "segment.zst")], check=True)
        baseline.append(time.perf_counter() - started)
    reference = statistics.median(baseline)
    row("zstd -T0 -3 SEG -o file (reference)", baseline, reference)
    for index, (label, repository) in enumerate(targets.items()):
        path = WORK / f"walbench-{index}.toml"
        path.write_text("[compression]\nlevel = 3\n\n" + repository + job)
        latencies = []
        for segment in segments:
            started = time.perf_counter()
            subprocess.run([str(LIFEBOAT), "--config", str(path), "wal-push", str(segment)], env=env,
                           check=True, stdout=subprocess.DEVNULL)
            latencies.append(time.perf_counter() - started)
        # The peak RSS from GNU time, in pushes of their own into a job of their own (GNU
        # time adds its fork to the latency, so the timed pushes above go without it).
        measured = WORK / f"walbench-rss-{index}.toml"
        measured.write_text(path.read_text().replace('"walbench"', f'"walrss{index}"'))
        peaks = [measure([str(LIFEBOAT), "--config", str(measured), "wal-push", str(segment)],
                         env=env)[2] for segment in segments[:10]]
        row(f"lifeboat wal-push → {label}", latencies, reference, max(peaks) / 1024)
        if label == "local repository":
            median = statistics.median(latencies) * 1000
            verdict = "within" if median <= 30 and max(peaks) <= 24 << 10 else "OVER"
            print(f"  {'':44} median {median:.0f} ms, peak {max(peaks) >> 10} MiB "
                  f"(target <= 30 ms, <= 24 MiB: {verdict})")


def row(label, latencies, reference, peak_mib=None):
    median = statistics.median(latencies)
    peak = "" if peak_mib is None else f" {peak_mib:6.0f}MiB"
    print(f"  {label:44} {median * 1000:8.0f}ms {percentile(latencies, 0.95) * 1000:8.0f}ms "
          f"{max(latencies) * 1000:8.0f}ms {median / reference:7.2f}x{peak}")


if __name__ == "__main__":
    main()
