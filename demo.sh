#!/usr/bin/env bash
# Builds shuyuan and runs the demo: a hub and three department agents on this
# machine, with live changes and zero-updates. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --locked --workspace --bins
exec target/release/shuyuan-demo "$@"
