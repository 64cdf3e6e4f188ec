#!/usr/bin/env bash
# Builds release binaries and runs the benchmark; prints Markdown tables for
# BENCHMARKS.md. Options go to shuyuan-bench (see --help).
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --locked --workspace --bins
exec target/release/shuyuan-bench "$@"
