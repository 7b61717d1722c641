#!/usr/bin/env python3
"""Peak RSS of a logical backup of data that does not compress away (the `realistic` set of
benches/datasets.py: random text, numerics, timestamps and bytea, about 3-5x with zstd),
into one SeaweedFS region, into two regions and a local repository, and into a local
repository alone, and of a restore from one region; two binaries alternating runs, in one
command:

    python3 benches/backup_memory.py --baseline OLD_BINARY [--candidate NEW_BINARY]
                                     [--realistic-mib 750] [--runs 3]

Prints, per configuration and binary, the largest and the median peak RSS, the median wall
time and the stored size. pgbench data compresses about 100x and hides what the upload path
holds; this is the set the memory budget is judged on.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
from benchlib import LIFEBOAT, ROOT, require  # noqa: E402
from postgres import DATA, Cluster  # noqa: E402
from regions import ACCESS_KEY, SECRET_KEY, Region  # noqa: E402

WORK = DATA.parent / "backup-memory"


def run(binary, config, env, command=("backup", "bench")):
    """(peak RSS MiB, wall s) of one run, from GNU time (a restore's includes pg_restore's)."""
    out = subprocess.run(["/usr/bin/time", "-f", "BENCH %M %e", binary, "-q", "--config", str(config),
                          *command], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{command[0]} failed ({binary}):\n{out.stdout}{out.stderr}")
    line = [l for l in out.stderr.splitlines() if l.startswith("BENCH ")][-1].split()
    return int(line[1]) / 1024, float(line[2])


def alternate(binaries, runs, one_run):
    """{name: [sample, …]}: `runs` samples of `one_run(name, binary)` per binary, the order
    of the binaries reversed every other round."""
    samples = {name: [] for name in binaries}
    for index in range(runs):
        order = list(binaries.items()) if index % 2 == 0 else list(reversed(binaries.items()))
        for name, binary in order:
            samples[name].append(one_run(name, binary))
    return samples


def print_rows(label, samples, stored):
    for name, taken in samples.items():
        rss = [r for r, _ in taken]
        wall = statistics.median(w for _, w in taken)
        print(f"  {label:26} {name:10} {max(rss):10.0f}MiB {statistics.median(rss):6.0f}MiB "
              f"{wall:11.2f}s {stored.get(name, '-'):>12}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="the lifeboat binary before the change")
    parser.add_argument("--candidate", default=str(LIFEBOAT))
    parser.add_argument("--realistic-mib", type=int, default=750)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    require()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    cluster = Cluster(0, (), name=f"realistic-{args.realistic_mib}",
                      fill=lambda c: datasets.fill_realistic(c, args.realistic_mib))
    regions = [Region("a", WORK), Region("b", WORK)]
    env = dict(os.environ, LIFEBOAT_LOG="error", AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    local = WORK / "local"
    job = (f'[[job]]\nname = "bench"\nkind = "postgres"\ndsn = "{cluster.dsn("postgres")}"\n'
           'databases = ["bench"]\n')
    local_repo = f'[[repository]]\nname = "local"\ntype = "local"\npath = "{local}"\n\n'
    # Every repository's first backup is the one into all three: each gets its marker then,
    # and none is a wiped one to the runs after.
    configs = {
        "two S3 regions + local": regions[0].repository() + regions[1].repository() + local_repo + job,
        "one S3 region": regions[0].repository() + job,
        "local only": local_repo + job,
    }
    binaries = {"baseline": args.baseline, "candidate": args.candidate}
    try:
        on_disk = int(cluster.psql("select pg_database_size('bench')")) >> 20
        print(f"logical backup of realistic-{args.realistic_mib} ({on_disk} MiB on disk), {args.runs} runs each")
        print(f"  {'':26} {'':10} {'peak RSS max':>13} {'median':>8} {'wall median':>12} {'stored':>12}")
        for label, text in configs.items():
            config = WORK / "lifeboat.toml"
            config.write_text(text)
            stored = {}

            def backup(name, binary):
                # The backups go, the marker stays: a repository without it while the
                # regions hold theirs is a wiped one, which a backup does not write to.
                shutil.rmtree(local / "jobs", ignore_errors=True)
                sample = run(binary, config, env)
                if "local" in label:
                    stored[name] = sum(p.stat().st_size for p in local.rglob("*.zst"))
                return sample

            samples = alternate(binaries, args.runs, backup)
            print_rows(label, samples, {name: f"{size >> 20} MiB" for name, size in stored.items()})
        # A logical restore of the newest backup from one region into a database beside the
        # source; it is dropped after each run.
        config = WORK / "lifeboat.toml"
        config.write_text(configs["one S3 region"])

        def restore(_name, binary):
            sample = run(binary, config, env, ("restore", "bench", "--target", cluster.dsn("postgres"),
                                               "--database", "bench", "--as", "restored"))
            cluster.psql("drop database restored")
            return sample

        print_rows("restore from one S3 region", alternate(binaries, args.runs, restore), {})
    finally:
        for region in regions:
            region.stop()
        cluster.stop()
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
