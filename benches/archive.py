#!/usr/bin/env python3
"""`verify --archive` at scale: a physical job's WAL archive of 10,000 segments (1 MiB each,
with 10 base backups) in a SeaweedFS repository. Prints wall time and peak RSS of

  - the first run, which reads and checks every segment;
  - a run with nothing new, which lists and reads the proof record only (alternating with
    a plain listing of the same keys by the AWS CLI, the floor any check must pay);
  - a run after 100 new segments, which reads those 100.

    python3 benches/archive.py                    # 10,000 segments, 3 runs
    python3 benches/archive.py --segments 2000 --runs 5

Targets, for nothing new: under 10 s and under 64 MiB peak RSS.
"""

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, ROOT, measure, print_table, require  # noqa: E402
from regions import ACCESS_KEY, SECRET_KEY, Region  # noqa: E402

SEGMENT_SIZE = 1 << 20
PAGE_MAGIC_15 = 0xD110
SYSTEM = 7_300_000_000_000_000_001
BACKUPS = 10


def segment_name(timeline, segment):
    per_id = 0x1_0000_0000 // SEGMENT_SIZE
    return f"{timeline:08X}{segment // per_id:08X}{segment % per_id:08X}"


def zstd_frame(header: bytes, size: int) -> bytes:
    """A zstd frame of `header` then zeros up to `size` bytes: a raw block, then RLE blocks
    of at most 128 KiB, as a segment that a WAL switch ended early compresses to."""
    def block(kind, block_size, last, body):
        value = int(last) | (kind << 1) | (block_size << 3)
        return value.to_bytes(3, "little") + body

    out = bytearray(b"\x28\xb5\x2f\xfd")  # magic
    out += bytes([0x00, 7 << 3])  # no content size, no checksum; window 128 KiB
    out += block(0, len(header), False, header)
    left = size - len(header)
    while left > 0:
        n = min(left, 128 * 1024)
        left -= n
        out += block(1, n, left == 0, b"\x00")
    return bytes(out)


def segment(segment_number: int) -> bytes:
    """A 1 MiB segment of timeline 1: PostgreSQL 15's long page header, then zeros."""
    header = struct.pack(
        "<HHIQI4xQII", PAGE_MAGIC_15, 2, 1, segment_number * SEGMENT_SIZE, 0, SYSTEM,
        SEGMENT_SIZE, 8192,
    )
    return zstd_frame(header, SEGMENT_SIZE)


def build(root: Path, segments: int):
    """A local repository as lifeboat writes it: the marker, BACKUPS base backups spread
    over the archive, and `segments` segments."""
    job = root / "jobs" / "db"
    (job / "wal" / "00000001").mkdir(parents=True)
    (root / "lifeboat.json").write_text(
        json.dumps({"format": 1, "created_at": "2026-01-01T00:00:00Z", "created_by": "bench"}))
    add_segments(root, 0, segments)
    # Each base backup: an empty tar stream (two zero blocks), stored as lifeboat stores it.
    raw = bytes(1024)
    stored = subprocess.run(["zstd", "-q", "-c"], input=raw, stdout=subprocess.PIPE, check=True).stdout
    digests = {"size": len(stored), "sha256": hashlib.sha256(stored).hexdigest(),
               "raw_size": len(raw), "raw_sha256": hashlib.sha256(raw).hexdigest()}
    for index in range(BACKUPS):
        first = 2 + index * (segments // BACKUPS)
        backup_id = f"2026010{index // 10 + 1}T{index % 10:02d}0000Z"
        stamp = f"2026-01-0{index // 10 + 1}T{index % 10:02d}:00:00Z"
        directory = job / "backups" / backup_id
        directory.mkdir(parents=True)
        (directory / "base.tar.zst").write_bytes(stored)
        manifest = {
            "format": 1, "id": backup_id, "job": "db", "kind": "postgres-physical",
            "started_at": stamp, "finished_at": stamp, "recovery_point": stamp,
            "tool_version": "bench", "host": "bench",
            "source": {
                "server_version": "15", "system_identifier": str(SYSTEM), "databases": [],
                "start_lsn": lsn(first * SEGMENT_SIZE),
                "stop_lsn": lsn((first + 1) * SEGMENT_SIZE + 0x100), "timeline": 1,
                "first_wal": segment_name(1, first), "last_wal": segment_name(1, first + 1),
                "wal_segment_size": SEGMENT_SIZE,
            },
            "objects": [{"name": "base.tar.zst", **digests, "compression": "zstd", "encryption": None}],
        }
        (directory / "manifest.json").write_text(sealed(manifest))


def lsn(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def sealed(manifest: dict) -> str:
    """The manifest's text with its seal: the sha256 of the text with the seal as 64 zeros."""
    unsealed = json.dumps(manifest)[:-1] + ', "manifest_sha256": "' + "0" * 64 + '"}\n'
    digest = hashlib.sha256(unsealed.encode()).hexdigest()
    return unsealed.replace("0" * 64 + '"}', digest + '"}')


def add_segments(root: Path, first: int, count: int):
    wal = root / "jobs" / "db" / "wal" / "00000001"
    for number in range(first, first + count):
        (wal / f"{segment_name(1, number)}.zst").write_bytes(segment(number))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--segments", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    require("aws", "zstd")
    work = Path(tempfile.mkdtemp(prefix="lifeboat-archive-bench-", dir=ROOT / "target"))
    region = Region("region", work)
    env = dict(os.environ, LIFEBOAT_LOG="error", AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    try:
        seed = work / "seed"
        build(seed, args.segments)
        s3 = region.repository()
        seed_config = work / "seed.toml"
        job = ('[[job]]\nname = "db"\nkind = "postgres"\nmode = "physical"\n'
               'dsn = "postgresql://postgres@127.0.0.1:9/postgres"\n')
        seed_config.write_text(f'[[repository]]\nname = "seed"\ntype = "local"\npath = "{seed}"\n\n{s3}{job}')
        config = work / "lifeboat.toml"
        config.write_text(f"{s3}{job}")
        lifeboat = [str(LIFEBOAT), "-q", "--config"]
        # Into the region through lifeboat itself: each segment is decoded and checked on the way.
        # A new region: --reseed copies everything and writes its marker.
        copied = subprocess.run(lifeboat + [str(seed_config), "replicate", "--reseed", "db"], env=env,
                                capture_output=True, text=True)
        if copied.returncode != 0:
            sys.exit(f"replicate into the region failed:\n{copied.stdout}{copied.stderr}")
        verify = lifeboat + [str(config), "verify", "--archive"]
        listing = ["aws", "--endpoint-url", region.endpoint, "s3api", "list-objects-v2",
                   "--bucket", "bench", "--prefix", "lifeboat/jobs/db/wal/", "--query", "KeyCount"]
        first_run = measure(verify, env=env)
        nothing_new, floor = [], []
        for _ in range(args.runs):
            nothing_new.append(measure(verify, env=env))
            floor.append(measure(listing, env=env))
        add_segments(seed, args.segments, 100)
        subprocess.run(lifeboat + [str(seed_config), "replicate", "db"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        hundred_new = measure(verify, env=env)
        counted = subprocess.run(lifeboat + [str(config), "verify", "--archive", "--format", "json"],
                                 env=env, capture_output=True, text=True)
        report = json.loads(counted.stdout)["checks"][0]
        print(f"verify --archive, {args.segments + 100} segments of {SEGMENT_SIZE >> 20} MiB and "
              f"{BACKUPS} base backups in a SeaweedFS repository (last run read {report['files_read']}, "
              f"{report['proven_before']} proven before)")
        values = print_table("", [
            ("first run: every segment read", [first_run]),
            ("nothing new: listing and the proof", nothing_new),
            ("floor: the same listing by the AWS CLI", floor),
            ("100 new segments", [hundred_new]),
        ])
        wall, _, rss = values["nothing new: listing and the proof"]
        floor_wall = values["floor: the same listing by the AWS CLI"][0]
        print(f"  nothing new / listing floor, wall: {wall / floor_wall:.2f}x")
        print(f"  nothing new: {wall:.2f}s (target < 10 s: {'met' if wall < 10 else 'MISSED'}), "
              f"{rss:.0f} MiB (target < 64 MiB: {'met' if rss < 64 else 'MISSED'})")
    finally:
        region.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
