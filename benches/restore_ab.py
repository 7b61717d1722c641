#!/usr/bin/env python3
"""Two lifeboat binaries restoring the same backups (and backing up the same config tree),
alternating runs, in one command: what a change to the restore path, or to the files
backup, costs, measured against the binary before it.

    python3 benches/restore_ab.py --baseline OLD_BINARY [--candidate NEW_BINARY]
                                  [--scale 50] [--config-mib 100] [--runs 5]

The backups are taken once with the candidate from a pgbench cluster (benches/postgres.py,
physical job, local repository) and a config tree (benches/datasets.py); then each run
restores, baseline and candidate in turn (the order flipped every run, caches dropped of
nothing: both read the same repository files, warm):
  files      `restore config --into DIR` of the config tree
  physical   `restore bench --data-dir DIR` of the base backup (unpack and recovery
             settings; the server is not started)
  backup     `backup config` of the config tree, each binary into a repository of its own,
             emptied before each run
and prints median wall and CPU time, peak RSS and the ratio candidate / baseline.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
from benchlib import LIFEBOAT, ROOT, measure, print_table, require  # noqa: E402
from postgres import DATA, Cluster, as_owner  # noqa: E402

WORK = DATA.parent / "restore-ab"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="the lifeboat binary before the change")
    parser.add_argument("--candidate", default=str(LIFEBOAT))
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--config-mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    require("/usr/bin/time")
    binaries = {"baseline": args.baseline, "candidate": args.candidate}

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    tree = datasets.config_tree(ROOT / "target" / "bench" / "config-trees" / f"pgbench-{args.config_mib}",
                                "pgbench", args.config_mib)
    config = WORK / "lifeboat.toml"
    archive = f"{args.candidate} --config {config} wal-push --job bench %p"
    cluster = Cluster(args.scale, ["wal_level=replica", "archive_mode=on", f"archive_command={archive}"],
                      name=f"pgbench-s{args.scale}")
    try:
        config.write_text(
            f'[[repository]]\nname = "local"\ntype = "local"\npath = "{WORK / "repo"}"\n\n'
            f'[[job]]\nname = "config"\nkind = "files"\npaths = ["{tree}"]\n\n'
            f'[[job]]\nname = "bench"\nkind = "postgres"\nmode = "physical"\n'
            f'dsn = "{cluster.dsn("postgres")}"\n')
        if os.geteuid() == 0:
            shutil.chown(WORK, "postgres", "postgres")
            shutil.chown(config, "postgres", "postgres")
        # The server's user takes the physical backup (its archive_command writes the same
        # repository); root the files one, which reads any file.
        for job, argv in [("bench", as_owner), ("config", lambda argv: argv)]:
            proc = subprocess.run(argv([args.candidate, "--config", str(config), "backup", job]),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"backup {job} failed:\n{proc.stderr}")
    finally:
        cluster.stop()

    rows = {}
    for name, restore in [("files", ["restore", "config", "--into"]),
                          ("physical", ["restore", "bench", "--data-dir"])]:
        samples = {side: [] for side in binaries}
        for run in range(args.runs):
            order = list(binaries) if run % 2 == 0 else list(reversed(binaries))
            for side in order:
                into = WORK / f"into-{side}"
                shutil.rmtree(into, ignore_errors=True)
                os.sync()
                sample = measure([binaries[side], "--config", str(config), *restore, str(into)])
                samples[side].append(sample)
                print(f"    {sample[0]:6.2f} s wall {sample[1]:6.2f} s CPU {sample[2] / 1024:5.0f} MiB"
                      f"  {side} {name}", flush=True)
                shutil.rmtree(into, ignore_errors=True)
        values = print_table(f"\n{name} restore", [(f"{side} {name}", samples[side]) for side in binaries])
        rows[name] = values[f"candidate {name}"][0] / values[f"baseline {name}"][0]
    samples = {side: [] for side in binaries}
    for run in range(args.runs):
        order = list(binaries) if run % 2 == 0 else list(reversed(binaries))
        for side in order:
            repo = WORK / f"backup-repo-{side}"
            side_config = WORK / f"backup-{side}.toml"
            side_config.write_text(
                f'[[repository]]\nname = "local"\ntype = "local"\npath = "{repo}"\n\n'
                f'[[job]]\nname = "config"\nkind = "files"\npaths = ["{tree}"]\n')
            shutil.rmtree(repo, ignore_errors=True)
            os.sync()
            sample = measure([binaries[side], "--config", str(side_config), "backup", "config"])
            samples[side].append(sample)
            print(f"    {sample[0]:6.2f} s wall {sample[1]:6.2f} s CPU {sample[2] / 1024:5.0f} MiB"
                  f"  {side} files backup", flush=True)
    values = print_table("\nfiles backup", [(f"{side} backup", samples[side]) for side in binaries])
    rows["files backup"] = values["candidate backup"][0] / values["baseline backup"][0]
    print()
    for name, ratio in rows.items():
        label = name if name.endswith("backup") else f"{name} restore"
        print(f"  ratio candidate / baseline, {label}: {ratio:.2f}")


if __name__ == "__main__":
    main()
