#!/usr/bin/env bash
# Fuzzes the JSON envelope decoder and link-config parsing with cargo fuzz (libFuzzer), which
# needs a nightly toolchain. Usage: ./scripts/fuzz.sh [seconds per target]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
rustup toolchain install nightly --profile minimal >/dev/null
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cd fuzz
for target in envelope config; do
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds"
done
