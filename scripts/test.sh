#!/usr/bin/env bash
# Quick start, command 2: runs the whole test suite: the unit tests of both
# crates (custos-core and the server), the integration tests on fresh
# SoftHSM tokens, and the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
cargo test --workspace --lib --tests "$@"
cargo test --workspace --doc
