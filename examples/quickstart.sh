#!/usr/bin/env bash
# Quickstart: back up a directory of configuration files to a local repository, verify it,
# restore it into an empty directory and compare. Everything lives under ./quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/lifeboat ] || cargo build --release --locked
lifeboat="$PWD/target/release/lifeboat"
here="$PWD/quickstart"
rm -rf "$here"
mkdir -p "$here/etc/app/conf.d" "$here/repository"

# Some configuration to protect.
printf 'listen 8080;\nworkers 4;\n' > "$here/etc/app/app.conf"
printf 'max_connections = 100\n' > "$here/etc/app/conf.d/db.conf"
printf 'token = s3cr3t\n' > "$here/etc/app/credentials"
chmod 600 "$here/etc/app/credentials"
ln -s conf.d/db.conf "$here/etc/app/database.conf"

cat > "$here/lifeboat.toml" <<TOML
[[repository]]
name = "local"
type = "local"
path = "$here/repository"

[[job]]
name = "config"
kind = "files"
paths = ["$here/etc/app"]
exclude = ["*.swp"]
TOML
export LIFEBOAT_CONFIG="$here/lifeboat.toml"

set -x
"$lifeboat" check
"$lifeboat" backup config
"$lifeboat" list
"$lifeboat" show latest --job config
"$lifeboat" verify config
"$lifeboat" restore config --backup latest --into "$here/restored"
diff -r --no-dereference "$here/etc/app" "$here/restored$here/etc/app"
set +x
echo "quickstart: restored tree is identical to the original (see $here/restored)"
