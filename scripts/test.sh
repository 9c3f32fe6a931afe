#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests under a real wasmCloud host.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --tests
exec cargo test --locked "$@"
