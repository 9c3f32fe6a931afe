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

# install <command> <debian package> <what to set instead>
updated=no
install() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $2 with apt-get" >&2
    if [ "$updated" = no ]; then apt-get update -qq >/dev/null; updated=yes; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "missing: $1 (sudo apt-get install $2, or set $3)" >&2
    exit 1
  fi
}
install "${TEST_NATS_BIN:-nats-server}" nats-server TEST_NATS_BIN
if [ "${1:-}" = --tests ]; then
  # The browser test opens a page in headless Chromium.
  install "${CHROMIUM_BIN:-chromium}" chromium CHROMIUM_BIN
fi
