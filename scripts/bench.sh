#!/usr/bin/env bash
# Runs the benchmark suite on loopback and prints a table: baselines B0 (TCP echo), B1 (raw
# WebSocket echo), B2 (NATS request/reply), and P (the provider with a native stand-in
# component). `./scripts/bench.sh --quick` runs the short smoke version.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --locked --release --bin messaging-websocket-provider
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
(cd bench && cargo build --locked --release)
bench_target="${CARGO_TARGET_DIR:-$PWD/bench/target}"
exec "$bench_target/release/ws-provider-bench" --provider "$target_dir/release/messaging-websocket-provider" "$@"
