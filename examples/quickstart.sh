#!/usr/bin/env bash
# Quickstart: a scratch PostgreSQL source with sample data, a scratch Redis with sessions,
# and a directory of configuration files, two local-directory repositories standing in for two regions ("primary" and "dr"),
# a backup of both jobs into both, then a restore drill that restores the database from "dr"
# alone into a scratch cluster, checks it and measures RTO and RPO; the same for the
# sessions (drills/sessions.toml); and a restore of the files compared with the original. Everything lives under ./quickstart/ (and a scratch
# cluster under /tmp that is removed at the end). Works as root (clusters run as `postgres`)
# and as an ordinary user.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/lifeboat ] || cargo build --release --locked
lifeboat="$PWD/target/release/lifeboat"
here="$PWD/quickstart"
rm -rf "$here"
mkdir -p "$here/etc/app/conf.d"

pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -x "$pg_bin/initdb" ] || { echo "quickstart: PostgreSQL server binaries not found; run: bash .ci/setup" >&2; exit 1; }
# initdb refuses root: as root, the cluster runs as `postgres` (setpriv execs, so $! below
# is the postmaster's own pid).
as_owner=()
[ "$(id -u)" = 0 ] && as_owner=(setpriv --reuid=postgres --regid=postgres --init-groups --)

# The source: a scratch cluster on a Unix socket in its own directory, stopped at exit.
source_dir="$(mktemp -d /tmp/lifeboat-quickstart-XXXXXX)"
[ "$(id -u)" = 0 ] && chown postgres: "$source_dir"
cleanup() {
    if [ -n "${redis_pid:-}" ]; then
        kill "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    if [ -n "${source_pid:-}" ]; then
        kill -INT "$source_pid" 2>/dev/null || true   # fast shutdown of the postmaster
        wait "$source_pid" 2>/dev/null || true
    fi
    rm -rf "$source_dir"
}
trap cleanup EXIT
"${as_owner[@]}" "$pg_bin/initdb" -D "$source_dir/data" -U quickstart --auth=trust -E UTF8 \
    --locale=C.UTF-8 --no-sync > /dev/null
"${as_owner[@]}" "$pg_bin/postgres" -D "$source_dir/data" -p 5432 -k "$source_dir" \
    -c listen_addresses= > "$source_dir/postgres.log" 2>&1 &
source_pid=$!
for _ in $(seq 100); do
    "$pg_bin/pg_isready" -q -h "$source_dir" -p 5432 && break
    sleep 0.1
done
psql() { "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$source_dir" -p 5432 -U quickstart "$@"; }
psql -d postgres -c "create database shop"
psql -d shop <<'SQL'
create table customers (id int primary key, name text not null);
create table orders (id int primary key, customer_id int not null references customers,
                     created_at timestamptz not null, total numeric(10, 2) not null);
insert into customers select i, 'Kunde ' || i from generate_series(1, 1000) i;
insert into orders select i, 1 + i % 1000, now() - i * interval '1 minute', (i % 500) / 7.0
    from generate_series(1, 10000) i;
SQL

# Sessions in a scratch Redis on a free loopback port, with a password.
command -v redis-server > /dev/null || { echo "quickstart: redis-server not found; run: bash .ci/setup" >&2; exit 1; }
redis_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
printf 'quickstart-redis\n' > "$source_dir/redis.pass"
chmod 600 "$source_dir/redis.pass"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$source_dir" --save '' \
    --requirepass quickstart-redis --logfile "$source_dir/redis.log" > /dev/null 2>&1 &
redis_pid=$!
rcli() { REDISCLI_AUTH=quickstart-redis redis-cli -p "$redis_port" "$@"; }
for _ in $(seq 100); do
    [ "$(rcli ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
done
for i in $(seq 1 2000); do
    printf 'SET session:%d user-%d EX 86400\n' "$i" "$i"
done | rcli > /dev/null
rcli hset config:site name shop currency EUR > /dev/null

# Some configuration to protect.
printf 'listen 8080;\nworkers 4;\n' > "$here/etc/app/app.conf"
printf 'max_connections = 100\n' > "$here/etc/app/conf.d/db.conf"
printf 'token = s3cr3t\n' > "$here/etc/app/credentials"
chmod 600 "$here/etc/app/credentials"
ln -s conf.d/db.conf "$here/etc/app/database.conf"

cat > "$here/lifeboat.toml" <<TOML
[[repository]]
name = "primary"
type = "local"
path = "$here/region-primary"

[[repository]]
name = "dr"
type = "local"
path = "$here/region-dr"

[[job]]
name = "shop"
kind = "postgres"
dsn = "host=$source_dir port=5432 user=quickstart dbname=postgres"
databases = ["shop"]
heartbeat = true

[[job]]
name = "sessions"
kind = "redis"
url = "redis://127.0.0.1:$redis_port"
password_file = "$source_dir/redis.pass"
heartbeat = true

[[job]]
name = "config"
kind = "files"
paths = ["$here/etc/app"]
exclude = ["*.swp"]
TOML
export LIFEBOAT_CONFIG="$here/lifeboat.toml"

set -x
"$lifeboat" check
"$lifeboat" backup --all
"$lifeboat" list
"$lifeboat" verify
"$lifeboat" drill run drills/quickstart.toml --report-dir "$here/drill-reports"
"$lifeboat" drill run drills/sessions.toml --report-dir "$here/drill-reports"
"$lifeboat" drill history
"$lifeboat" restore config --backup latest --from dr --into "$here/restored"
diff -r --no-dereference "$here/etc/app" "$here/restored$here/etc/app"
set +x
echo "quickstart: the drills passed (reports in $here/drill-reports); the restored files are identical (see $here/restored)"
