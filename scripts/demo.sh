#!/usr/bin/env bash
# Runs the end-to-end demo: NATS, an in-process wasmCloud host, the provider, the echo example
# component and a WebSocket server, printing the messages that flow.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --locked --bin messaging-websocket-provider
exec cargo run --locked --example demo
