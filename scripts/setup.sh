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
# several filter subjects); Debian 12 ships 2.9.10. Debian 13's package runs on Debian 12: take
# its binary (pinned, checksummed) into /usr/local/bin, which comes first on PATH.
nats_deb=nats-server_2.10.27-1+b2_amd64.deb
nats_sha=6d913ac987b78734c08537c2adeb1526cf735f216173a9170d94b185fcfe6f8a
nats_version() { "${TEST_NATS_BIN:-nats-server}" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p'; }
read -r major minor <<<"$(nats_version)" || true
if [ -z "${TEST_NATS_BIN:-}" ] && { [ "${major:-0}" -lt 2 ] || { [ "${major:-0}" -eq 2 ] && [ "${minor:-0}" -lt 10 ]; }; }; then
  if [ "$(id -u)" = 0 ] && [ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ]; then
    echo "installing nats-server 2.10 (from Debian 13's $nats_deb) into /usr/local/bin" >&2
    tmp=$(mktemp -d)
    curl -fsSL -o "$tmp/$nats_deb" "http://deb.debian.org/debian/pool/main/n/nats-server/$nats_deb"
    echo "$nats_sha  $tmp/$nats_deb" | sha256sum -c --quiet
    dpkg-deb -x "$tmp/$nats_deb" "$tmp/root"
    cp "$tmp/root/usr/sbin/nats-server" /usr/local/bin/nats-server && chmod 0755 /usr/local/bin/nats-server
    rm -rf "$tmp"
    hash -r
  else
    echo "missing: nats-server 2.10 or later (wadm needs it; found ${major:-?}.${minor:-?}): install it, or set TEST_NATS_BIN" >&2
    exit 1
  fi
fi
if [ "${1:-}" = --tests ]; then
  # The browser test opens a page in headless Chromium.
  install "${CHROMIUM_BIN:-chromium}" chromium CHROMIUM_BIN
fi
