#!/usr/bin/env python3
"""Pipeline benchmark: lifeboat's backup of one 1 GiB file into a local repository, beside
`zstd -T0 -3 | sha256sum` on the same input, runs alternating, in the same command.

    python3 benches/pipeline.py [--size-mib 1024] [--runs 5]

Prints median wall time, CPU time (user+sys), peak RSS and throughput for each, and the ratio
lifeboat / baseline. lifeboat does more than the baseline: a tar stream, two sha256 (raw and
stored), and a durable write of the output (fsync + rename); the baseline discards its output.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LIFEBOAT, ROOT, measure, require  # noqa: E402

DATA = ROOT / "target" / "bench" / "pipeline"


def make_input(size_mib: int) -> Path:
    """Log- and dump-like text with random ids and hashes; zstd -3 shrinks it about 2.3x."""
    path = DATA / f"input-{size_mib}MiB.txt"
    if path.exists() and path.stat().st_size == size_mib << 20:
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)
    words = [f"{rng.choice(['user', 'order', 'item', 'session', 'cart'])}_{n}" for n in range(5000)]
    lines = []
    size = 0
    while size < 64 << 20:
        line = "%d\t%s\t%s\t%0.2f\t2026-%02d-%02dT%02d:%02d:%02dZ\t%s\n" % (
            rng.randrange(10**9), rng.choice(words), rng.choice(words), rng.random() * 1000,
            rng.randrange(1, 13), rng.randrange(1, 29), rng.randrange(24), rng.randrange(60),
            rng.randrange(60), "%016x" % rng.getrandbits(64))
        lines.append(line)
        size += len(line)
    block = "".join(lines).encode()[: 64 << 20]
    with open(path, "wb") as out:
        for _ in range(size_mib // 64):
            out.write(block)
        out.write(block[: (size_mib % 64) << 20])
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    require("zstd", "sha256sum", "/usr/bin/time")

    source = make_input(args.size_mib)
    repo = DATA / "repo"
    config = DATA / "lifeboat.toml"
    config.write_text(
        f'[compression]\nlevel = 3\nthreads = 0\n\n'
        f'[[repository]]\nname = "local"\ntype = "local"\npath = "{repo}"\n\n'
        f'[[job]]\nname = "bench"\nkind = "files"\npaths = ["{source}"]\n'
    )
    env = dict(os.environ, LIFEBOAT_CONFIG=str(config), LIFEBOAT_LOG="error")
    # Warm the page cache so both sides read the input from memory.
    subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)

    baseline_cmd = ["sh", "-c", f"zstd -T0 -3 -c < '{source}' | sha256sum"]
    lifeboat_cmd = [str(LIFEBOAT), "backup", "bench"]
    results = {"baseline": [], "lifeboat": []}
    for run in range(args.runs):
        shutil.rmtree(repo, ignore_errors=True)
        order = [("baseline", baseline_cmd), ("lifeboat", lifeboat_cmd)]
        if run % 2:
            order.reverse()
        for name, argv in order:
            results[name].append(measure(argv, env))

    stored = sum(f.stat().st_size for f in repo.rglob("*.zst"))
    size = source.stat().st_size

    def row(name):
        walls, cpus, rss = zip(*results[name])
        wall = statistics.median(walls)
        return wall, statistics.median(cpus), max(rss) / 1024, size / wall / (1 << 20)

    base, lb = row("baseline"), row("lifeboat")
    print(f"input: {size / (1 << 20):.0f} MiB, stored by lifeboat: {stored / (1 << 20):.0f} MiB "
          f"(ratio {size / stored:.1f}x), {args.runs} runs each, alternating, cpus={os.cpu_count()}")
    print(f"{'':28} {'wall (median)':>14} {'cpu (median)':>13} {'peak RSS':>10} {'throughput':>12}")
    print(f"{'zstd -T0 -3 | sha256sum':28} {base[0]:13.2f}s {base[1]:12.2f}s {base[2]:7.0f}MiB {base[3]:8.0f}MiB/s")
    print(f"{'lifeboat backup (local)':28} {lb[0]:13.2f}s {lb[1]:12.2f}s {lb[2]:7.0f}MiB {lb[3]:8.0f}MiB/s")
    print(f"{'ratio lifeboat / baseline':28} {lb[0] / base[0]:13.2f}x {lb[1] / base[1]:12.2f}x")


if __name__ == "__main__":
    main()
