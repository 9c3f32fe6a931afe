#!/usr/bin/env bash
# The wasmCloud user's path with the `wash` CLI, scripted end to end:
#  1. a local nats-server (JetStream) and the development host (`cargo run --example devhost`:
#     a wasmCloud host and wadm in one process);
#  2. `wash build --skip-fetch`: the provider's signed PAR; the chat example component;
#  3. `wash app deploy examples/chat/wadm.yaml`, then `wash app status` until it is deployed,
#     and `wash get inventory`;
#  4. a WebSocket client (examples/wsclient.rs) joins the chat room through the provider;
#  5. `wash app undeploy` and `wash app delete`.
# Needs wash 0.43: `cargo install wash --version 0.43.0 --locked` (about 20 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
command -v wash >/dev/null 2>&1 || {
  echo "missing: wash 0.43 (cargo install wash --version 0.43.0 --locked)" >&2
  exit 1
}
port=${NATS_PORT:-4222}
ctl=(--ctl-host 127.0.0.1 --ctl-port "$port")
store=$(mktemp -d)
pids=()
cleanup() {
  # Newest first: the devhost stops its host (and the provider it runs) before NATS goes.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -INT "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$store"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "building: the provider, the devhost and the client examples, the chat component, the PAR"
cargo build --locked --bin messaging-websocket-provider --example devhost --example wsclient
cargo build --locked --release --target wasm32-wasip2 --manifest-path examples/chat/Cargo.toml
wash build --skip-fetch

step "starting nats-server (JetStream) on port $port and the development host"
nats-server -js -a 127.0.0.1 -p "$port" -sd "$store" >/dev/null 2>&1 &
pids+=($!)
sleep 1
target/debug/examples/devhost --nats "nats://127.0.0.1:$port" &
pids+=($!)
for _ in $(seq 1 60); do
  wash get hosts "${ctl[@]}" 2>/dev/null | grep -q '^  *N' && break
  sleep 1
done
wash get hosts "${ctl[@]}"

step "wash app deploy examples/chat/wadm.yaml"
wash app deploy examples/chat/wadm.yaml "${ctl[@]}"
for _ in $(seq 1 120); do
  wash app status ws-chat -o json "${ctl[@]}" 2>/dev/null | grep -qi '"type": *"deployed"' && break
  sleep 1
done
wash app status ws-chat "${ctl[@]}"
wash get inventory "${ctl[@]}"

step "a WebSocket client joins the chat room at ws://127.0.0.1:8090/chat"
target/debug/examples/wsclient ws://127.0.0.1:8090/chat "/nick walkthrough" "hello from the wash walkthrough"

step "wash app undeploy / delete"
wash app undeploy ws-chat "${ctl[@]}"
wash app delete ws-chat "${ctl[@]}"
