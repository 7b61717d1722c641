#!/usr/bin/env python3
"""Prune at scale: a physical job with N backups (one an hour) and 10 WAL segments per backup
in a local repository, pruned to a daily/weekly/monthly policy. Prints wall time and peak RSS
of `prune --dry-run` and `prune` at a tenth of the size, at the full size, and at the full
number of backups with one segment each: the rows show what memory grows with (backups) and
what it does not (WAL, listed and removed a page at a time).

    python3 benches/prune.py                      # 10,000 backups, 100,000 segments
    python3 benches/prune.py --backups 2000
"""

import argparse
import datetime
import json
import shutil
import tempfile
from pathlib import Path

from benchlib import LIFEBOAT, measure, require

SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENTS_PER_BACKUP = 10
POLICY = "{ keep_daily = 7, keep_weekly = 4, keep_monthly = 12 }"


def segment_name(timeline, segment):
    per_id = 0x1_0000_0000 // SEGMENT_SIZE
    return f"{timeline:08X}{segment // per_id:08X}{segment % per_id:08X}"


def build(root: Path, backups: int, segments_per_backup: int):
    """A repository as lifeboat writes it, without the cost of taking real base backups."""
    job = root / "jobs" / "db"
    root.mkdir(parents=True)
    (root / "lifeboat.json").write_text(
        json.dumps({"format": 1, "created_at": "2026-01-01T00:00:00Z", "created_by": "bench"})
    )
    first = datetime.datetime(2025, 1, 1, 3, tzinfo=datetime.timezone.utc)
    wal = job / "wal" / "00000001"
    wal.mkdir(parents=True)
    for i in range(backups):
        at = first + datetime.timedelta(hours=i)
        backup_id = at.strftime("%Y%m%dT%H%M%SZ")
        directory = job / "backups" / backup_id
        directory.mkdir(parents=True)
        (directory / "base.tar.zst").write_bytes(b"base")
        stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
        start = i * segments_per_backup
        manifest = {
            "format": 1, "id": backup_id, "job": "db", "kind": "postgres-physical",
            "started_at": stamp, "finished_at": stamp, "recovery_point": stamp,
            "tool_version": "bench", "host": "bench",
            "source": {
                "server_version": "15", "system_identifier": "1", "databases": [],
                "start_lsn": None, "stop_lsn": None, "timeline": 1,
                "first_wal": segment_name(1, start), "last_wal": segment_name(1, start + 1),
                "wal_segment_size": SEGMENT_SIZE,
            },
            "objects": [{
                "name": "base.tar.zst", "size": 4, "sha256": "0" * 64, "raw_size": 4,
                "raw_sha256": "0" * 64, "compression": "zstd", "encryption": None,
            }],
        }
        (directory / "manifest.json").write_text(json.dumps(manifest))
        for segment in range(start, start + segments_per_backup):
            (wal / f"{segment_name(1, segment)}.zst").write_bytes(b"w")
    return first + datetime.timedelta(hours=backups)


def config(work: Path, repo: Path):
    path = work / "lifeboat.toml"
    path.write_text(
        f'[[repository]]\nname = "local"\ntype = "local"\npath = "{repo}"\n\n'
        '[[job]]\nname = "db"\nkind = "postgres"\nmode = "physical"\n'
        'dsn = "postgresql://postgres@127.0.0.1:5432/postgres"\n'
        f"retention = {POLICY}\n"
    )
    return path


def files_under(root: Path):
    return sum(1 for p in root.rglob("*") if p.is_file())


def run(backups: int, segments_per_backup: int, work: Path):
    repo = work / f"repo-{backups}"
    build(repo, backups, segments_per_backup)
    cfg = config(work, repo)
    before = files_under(repo)
    dry = measure([str(LIFEBOAT), "--config", str(cfg), "-q", "prune", "--dry-run"])
    real = measure([str(LIFEBOAT), "--config", str(cfg), "-q", "prune"])
    after = files_under(repo)
    shutil.rmtree(repo)
    return before, after, dry, real


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backups", type=int, default=10_000)
    args = parser.parse_args()
    require()
    small = max(args.backups // 10, 100)
    with tempfile.TemporaryDirectory(prefix="lifeboat-prune-bench-") as tmp:
        rows = []
        for backups, per_backup in ((small, SEGMENTS_PER_BACKUP), (args.backups, SEGMENTS_PER_BACKUP), (args.backups, 1)):
            before, after, dry, real = run(backups, per_backup, Path(tmp))
            rows.append((backups, backups * per_backup, before, after, dry, real))
    print(f"prune of a physical job, local repository, policy {POLICY}")
    print(f"  {'backups':>8} {'WAL':>8} {'files before':>13} {'after':>7}"
          f" {'dry-run wall':>13} {'RSS':>8} {'prune wall':>11} {'RSS':>8}")
    for backups, segments, before, after, dry, real in rows:
        print(f"  {backups:>8} {segments:>8} {before:>13} {after:>7}"
              f" {dry[0]:12.2f}s {dry[2] / 1024:6.1f}MiB {real[0]:10.2f}s {real[2] / 1024:6.1f}MiB")
    small_rss, big_rss, few_wal_rss = (row[5][2] for row in rows)
    print(f"  peak RSS of prune, 10x the backups and WAL: {big_rss / small_rss:.2f}x;"
          f" 10x the WAL alone: {big_rss / few_wal_rss:.2f}x")


if __name__ == "__main__":
    main()
