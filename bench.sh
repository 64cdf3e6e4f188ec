#!/usr/bin/env bash
# Builds release binaries and runs the benchmark; prints Markdown tables for
# BENCHMARKS.md. Options go to shuyuan-bench (see --help).
# `./bench.sh pg [--mode none|native|shuyuan|all] [--scale 10] [--seconds 30]
# [--clients 4]` compares shuyuan with PostgreSQL's native logical
# replication on a pgbench load; it needs the PostgreSQL server binaries
# (`.ci/run` installs the Debian `postgresql` package).
# `./bench.sh federation [--samples 50] [--rows 200000] [--runs 3]` measures
# the latency from a source change to each level of a district -> city ->
# province chain of hubs, and rows per second through a middle hub against
# straight into one.
# `./bench.sh connections [--agents 1000] [--batches 5]` holds that many agent
# connections to one hub and reports its resident memory (peak and per
# connection) against none.
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == pg ]] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "./bench.sh pg needs PostgreSQL: run .ci/run (or apt-get install postgresql)" >&2
    exit 1
fi
cargo build --release --locked --workspace --bins
exec target/release/shuyuan-bench "$@"
