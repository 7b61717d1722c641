"""The data the benchmark suite backs up, in two flavours each: `pgbench`, which compresses
60-100x with zstd and flatters every compressor, and `realistic`, which compresses 3-5x like
production data (random text, numbers, timestamps, some bytea and binary files).

Every generator is seeded, so two runs of the suite back up the same bytes."""

import random
import subprocess
from pathlib import Path


DATASETS = ("pgbench", "realistic")

# A vocabulary to draw words from: text that compresses like text, not like zeros.
WORDS = ("order invoice customer payment refund shipment warehouse parcel address street city "
         "country region account session token login logout cart checkout discount coupon "
         "product variant price currency tax vat total subtotal status pending paid shipped "
         "delivered cancelled returned review rating comment reply support ticket agent queue "
         "priority high medium low urgent note internal external partner supplier contract "
         "renewal trial subscription plan monthly yearly seat license feature flag rollout").split()


def fill_realistic(cluster, mib):
    """Tables of customers and events — random text, numerics, timestamps, json-ish text and
    bytea — until the database holds about MIB MiB; pg_dump | zstd -3 shrinks it 3-5x."""
    psql = cluster.psql
    psql("create database bench")
    words = ",".join(f"'{w}'" for w in WORDS)
    psql(f"""
        create table words as select w, row_number() over () as n from unnest(array[{words}]) w;
        create function word(seed float8) returns text language sql immutable as
          $$ select w from words where n = 1 + (seed * (select count(*) from words))::int % (select count(*) from words) $$;
        create table customers (id bigint primary key, name text, email text, country char(2),
          signed_up timestamptz, balance numeric(14,2), notes text);
        create table events (id bigint primary key, customer_id bigint, kind text, at timestamptz,
          amount numeric(12,2), payload text, digest bytea);
        """, "bench")
    batch = 200_000
    done = 0
    while int(psql("select pg_database_size('bench')")) < mib * 2**20:
        psql(f"""
            insert into customers select g, initcap(word(random())) || ' ' || initcap(substr(md5(g::text), 1, 6)), 'user' || g || '@example.' ||
              (array['com','org','net','io'])[1 + g % 4], (array['DE','FR','US','GB','NL','SE','JP','BR'])[1 + (g * 7) % 8],
              date_trunc('second', timestamptz '2020-01-01' + (random() * 2000) * interval '1 day'), round((random() * 100000)::numeric, 2),
              case when g % 3 = 0 then null else word(random()) || ' ' || word(random()) || ' ' || word(random()) end
            from generate_series({done // 10 + 1}, {(done + batch) // 10}) g;
            insert into events select g, 1 + (random() * {(done + batch) // 10})::bigint,
              (array['login','view','cart','checkout','payment','refund','logout','search'])[1 + (random() * 7)::int],
              date_trunc('second', timestamptz '2024-01-01' + (random() * 700) * interval '1 day'), round((random() * 2000)::numeric, 2),
              '{{"ip":"10.0.' || (random() * 16)::int || '.' || (random() * 255)::int ||
                '","agent":"' || word(random()) || '/' || (random() * 9)::int || '.' || (random() * 20)::int ||
                '","ref":"' || substr(md5(random()::text), 1, 8) || '","note":"' || word(random()) || ' ' ||
                word(random()) || ' ' || word(random()) || '"}}',
              decode(substr(md5(random()::text), 1, 16), 'hex')
            from generate_series({done + 1}, {done + batch}) g;
            """, "bench")
        done += batch
    psql("vacuum analyze", "bench")


def config_tree(root: Path, flavour: str, mib: int):
    """A tree like /etc plus application config: many small text files in nested
    directories, and (realistic) keys and certificates that do not compress."""
    if (root / ".complete").exists():
        return root
    subprocess.run(["rm", "-rf", str(root)], check=True)
    rng = random.Random(7)
    total = 0
    number = 0
    while total < mib * 2**20:
        directory = root / f"service-{number // 100:03}" / ("conf.d" if number % 3 else "")
        directory.mkdir(parents=True, exist_ok=True)
        if flavour == "realistic" and number % 10 == 9:
            body = rng.randbytes(rng.randrange(1024, 8192))
            path = directory / f"key-{number}.pem"
        else:
            lines = []
            for line in range(rng.randrange(50, 600)):
                key = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}"
                if flavour == "pgbench":
                    value = f"{rng.choice(WORDS)}"
                else:
                    value = rng.choice([f"{rng.getrandbits(48):x}", f"{rng.random() * 1000:.3f}",
                                        f"{rng.choice(WORDS)}-{rng.randrange(10**6)}",
                                        f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"])
                lines.append(f"{key} = {value}\n")
            body = "".join(lines).encode()
            path = directory / f"{rng.choice(WORDS)}-{number}.conf"
        path.write_bytes(body)
        total += len(body)
        number += 1
    (root / ".complete").write_text("")
    return root


def verify_files(root: Path, raw_mib: int):
    """Files of realistic text (about 3.5x with zstd -3) adding up to RAW_MIB MiB: what the
    verify benchmark stores. One 64 MiB block is made and each file holds it rotated by its
    own offset: far beyond zstd's window at level 3 (2 MiB), so each compresses as unique
    data, and no two files are alike."""
    if (root / ".complete").exists():
        return root
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    rng = random.Random(11)
    lines = []
    size = 0
    while size < 64 * 2**20:
        line = (f"{size}\t{rng.choice(WORDS)}_{rng.randrange(500)}\t{rng.choice(WORDS)} {rng.choice(WORDS)}"
                f"\t{rng.randrange(10**4) / 100:.2f}\t2026-{rng.randrange(1, 13):02}-{rng.randrange(1, 29):02}\n")
        lines.append(line)
        size += len(line)
    block = "".join(lines).encode()[: 64 * 2**20]
    for number in range(max(1, raw_mib // 64)):
        at = rng.randrange(len(block))
        (root / f"data-{number:03}.log").write_bytes(block[at:] + block[:at])
    (root / ".complete").write_text("")
    return root


def resp(*args):
    """One command in the Redis protocol, for redis-cli --pipe."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def pipe_commands(port, commands):
    """Sends `commands` (RESP-encoded) through redis-cli --pipe, 10,000 at a time."""
    pipe = subprocess.Popen(["redis-cli", "-p", str(port), "--pipe"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    batch = []
    for command in commands:
        batch.append(command)
        if len(batch) == 10000:
            pipe.stdin.write(b"".join(batch))
            batch = []
    pipe.stdin.write(b"".join(batch))
    pipe.stdin.close()
    pipe.wait()


def redis_fill(port, keys, flavour):
    """KEYS keys over redis-cli --pipe: strings with TTLs, hashes, lists, sets and sorted
    sets; `pgbench` values repeat words, `realistic` ones carry random ids and numbers."""
    rng = random.Random(42)

    def text():
        if flavour == "pgbench":
            return " ".join(WORDS[i % 8] for i in range(10))
        return " ".join(rng.choice(WORDS) for _ in range(6)) + f" {rng.getrandbits(40):x} {rng.random() * 100:.2f}"

    def commands():
        for i in range(keys):
            kind = i % 10
            if kind < 6:
                yield resp("SET", f"session:{i}", text(), "EX", 86400 + i % 3600)
            elif kind == 6:
                yield resp("HSET", f"user:{i}", "name", text(), "cart", rng.getrandbits(32), "seen", 1764000000 + i)
            elif kind == 7:
                yield resp("RPUSH", f"queue:{i}", *(text() for _ in range(3)))
            elif kind == 8:
                yield resp("SADD", f"tags:{i}", *(f"{rng.choice(WORDS)}{rng.randrange(50)}" for _ in range(4)))
            else:
                yield resp("ZADD", f"rank:{i}", rng.random(), "a", rng.random(), "b", rng.random(), "c")

    pipe_commands(port, commands())
