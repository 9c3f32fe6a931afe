#!/usr/bin/env bash
# Runs the benchmark suite on loopback and prints a table: baselines B0 (TCP echo), B1 (raw
# WebSocket echo), B2 (NATS request/reply), B3 (raw wRPC call), P (the provider with a native
# stand-in component), P-wasm (the provider under a real wasmCloud host with a wasm component)
# and P json (what RECOVERY=true and acknowledgments cost against plain FORMAT=json; alone:
# --only "P json"). `./scripts/bench.sh --quick` runs the short smoke version (no P-wasm).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --locked --release --bin messaging-websocket-provider
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
(cd bench && cargo build --locked --release)
bench_target="${CARGO_TARGET_DIR:-$PWD/bench/target}"
extra=()
# The host builds are not needed in --quick, nor with an --only list without P-wasm (e.g.
# --only "P json").
host=yes
previous=
for arg in "$@"; do
  if [ "$arg" = --quick ]; then host=no; fi
  if [ "$previous" = --only ] && [[ ",$arg," != *,P-wasm,* ]]; then host=no; fi
  previous=$arg
done
if [ "$host" = yes ]; then
  # P-wasm's host, in release (the first build takes 15-20 minutes on 2 cores), and the
  # first-party NATS messaging provider for the host-path comparison.
  cargo build --locked --release --example pwasm
  (cd bench/nats-provider && cargo build --locked --release)
  nats_target="${CARGO_TARGET_DIR:-$PWD/bench/nats-provider/target}"
  extra=(--pwasm "$target_dir/release/examples/pwasm"
    --nats-provider "$nats_target/release/nats-messaging-provider")
fi
exec "$bench_target/release/ws-provider-bench" --provider "$target_dir/release/messaging-websocket-provider" "${extra[@]}" "$@"
