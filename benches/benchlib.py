"""Shared by the benchmark scripts: running a command under GNU time, and the table."""

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# LIFEBOAT=PATH runs another build (an older one, to compare a suite row before and after).
LIFEBOAT = Path(os.environ.get("LIFEBOAT", ROOT / "target" / "release" / "lifeboat"))


def require(*tools):
    for tool in tools:
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed for this benchmark; run `bash .ci/setup`")
    if not LIFEBOAT.exists():
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)


def measure(argv, env=None, shell=False):
    """Runs argv under GNU time; returns (wall s, cpu s, peak RSS KiB of the largest process).

    GNU time, not this script's own wait4: a child forked from a large Python process would
    report Python's RSS as its peak."""
    if shell:
        argv = ["bash", "-c", argv]
    timed = ["/usr/bin/time", "-f", "BENCH %e %U %S %M"] + list(argv)
    proc = subprocess.run(timed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(map(str, argv))}\n{proc.stderr}")
    line = [l for l in proc.stderr.splitlines() if l.startswith("BENCH ")][-1]
    wall, user, system, rss = line.split()[1:]
    return float(wall), float(user) + float(system), int(rss)


def summary(samples):
    walls, cpus, rss = zip(*samples)
    return statistics.median(walls), statistics.median(cpus), max(rss) / 1024


def print_table(title, rows, reference=None):
    """rows: [(label, samples)]; ratios are against the row labelled `reference`."""
    print(title)
    print(f"  {'':44} {'wall (median)':>14} {'cpu (median)':>13} {'peak RSS':>10}")
    values = {label: summary(samples) for label, samples in rows}
    for label, _ in rows:
        wall, cpu, rss = values[label]
        print(f"  {label:44} {wall:13.2f}s {cpu:12.2f}s {rss:7.0f}MiB")
    return values


def ratio_line(name, lifeboat, baseline, target):
    ratio = lifeboat[0] / baseline[0]
    verdict = "within" if ratio <= target else "OVER"
    print(f"  ratio {name:38} {ratio:13.2f}x   (target <= {target}: {verdict})")
