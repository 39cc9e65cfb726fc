#!/usr/bin/env bash
# Quick start, command 2: runs the whole test suite (unit, integration on fresh
# SoftHSM tokens, doc tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
cargo test --lib --tests "$@"
