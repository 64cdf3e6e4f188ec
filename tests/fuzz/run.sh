#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default: $FUZZ_SECONDS,
# else 60), starting from the checked-in seeds copied to a scratch directory
# so that a run never changes the tree. Fails if any target finds a crash,
# a broken invariant, a timeout or a leak; the input that did it is kept
# in tests/fuzz/artifacts/<target>/ (not checked in) to reproduce with
# `cargo fuzz run -s none --fuzz-dir tests/fuzz <target> <file>`.
#
# Stable Rust is enough: with `-s none` (no sanitizer, so no -Zsanitizer)
# cargo-fuzz passes only stable -C flags (sancov passes, debug assertions).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-${FUZZ_SECONDS:-60}}"
targets=(frame batch_verify catalog_change config)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "cargo-fuzz is required: cargo install --locked cargo-fuzz" >&2
    exit 1
fi
# cargo-fuzz has no --locked; fail here instead if Cargo.lock is stale.
cargo metadata --locked --format-version 1 >/dev/null

# Under the workspace's target/, so CI's build cache keeps the instrumented
# build too.
target_dir="$(cd ../.. && pwd)/target/fuzz"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

start=$(date +%s)
cargo fuzz build -s none --fuzz-dir . --target-dir "$target_dir"
echo "fuzz build: $(( $(date +%s) - start ))s"

failed=()
for target in "${targets[@]}"; do
    mkdir -p "$scratch/corpus/$target" "artifacts/$target"
    cp corpus/"$target"/* "$scratch/corpus/$target/"
    log="$scratch/$target.log"
    echo "fuzzing $target for ${seconds}s"
    if ! cargo fuzz run -s none --fuzz-dir . --target-dir "$target_dir" "$target" "$scratch/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=30 -print_final_stats=1 \
        -artifact_prefix="artifacts/$target/" >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        failed+=("$target")
    fi
    # The last status line and the final stats: coverage, runs, speed.
    status=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    echo "  $target: ${runs:-?} runs, ${speed:-?} execs/s, $(echo "$status" | grep -oE 'cov: [0-9]+ ft: [0-9]+' || echo 'cov: ?')"
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found failures in: ${failed[*]} (inputs in tests/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: ${#targets[@]} targets, ${seconds}s each, no failures"
