#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), two at a time, from the seeds in
# seeds/TARGET (and the shipped drills and example config); what libFuzzer learns goes to
# corpus/TARGET, a crash to artifacts/TARGET.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Not part of
# `.ci/run`: findings are fixed and their inputs kept as regression tests.
#   bash tests/fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config drill_file manifest tar_restore rdb_check wal_name durations_and_sizes)
cargo +nightly fuzz build --fuzz-dir . --sanitizer none
run() {
    local target="$1"
    mkdir -p "corpus/$target" "artifacts/$target"
    local status=0
    local seeds=()
    [ -d "seeds/$target" ] && seeds+=("seeds/$target")
    case "$target" in
        config) seeds+=(../../src/config) ;;   # the example config lifeboat init writes
        drill_file) seeds+=(../../drills) ;;
    esac
    cargo +nightly fuzz run --fuzz-dir . --sanitizer none "$target" "corpus/$target" "${seeds[@]}" \
        -- -max_total_time="$seconds" -print_final_stats=1 > "artifacts/$target.log" 2>&1 || status=$?
    echo "$target: exit $status; $(grep -E '^stat::number_of_executed_units' "artifacts/$target.log" | awk '{print $2}') runs in ${seconds}s"
    return $status
}
failed=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
    run "${targets[i]}" & first=$!
    second=""
    if [ $((i + 1)) -lt ${#targets[@]} ]; then
        run "${targets[i + 1]}" & second=$!
    fi
    wait "$first" || failed=1
    [ -z "$second" ] || wait "$second" || failed=1
done
exit $failed
