#!/usr/bin/env bash
# Installs what the demo and the tests need, or says exactly what is missing:
# the pinned Rust toolchain with the wasm32-wasip2 target (from rust-toolchain.toml) and nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v rustup >/dev/null 2>&1; then
  echo "missing: rustup (install it from https://rustup.rs, then run this again)" >&2
  exit 1
fi
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
rustup toolchain install "$toolchain" --profile minimal -c rustfmt,clippy -t wasm32-wasip2 >/dev/null

if ! command -v "${TEST_NATS_BIN:-nats-server}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing nats-server with apt-get" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  else
    echo "missing: nats-server (sudo apt-get install nats-server, or set TEST_NATS_BIN)" >&2
    exit 1
  fi
fi
