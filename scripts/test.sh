#!/usr/bin/env bash
# Quick start, command 2: runs the whole test suite: the unit tests of both
# crates (custos-core and the server), the integration tests on fresh
# SoftHSM tokens, and the doc tests. The PostgreSQL tests use the server at
# CUSTOS_TEST_POSTGRES_URL (password in CUSTOS_TEST_POSTGRES_PASSWORD_FILE)
# when it is set; otherwise this starts a throwaway cluster (scripts/pg.sh)
# and tears it down at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
if [ -z "${CUSTOS_TEST_POSTGRES_URL:-}" ]; then
    pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/custos-pg.XXXXXX")
    trap 'bash scripts/pg.sh stop "$pg_dir" || true; rm -rf "$pg_dir"' EXIT
    CUSTOS_TEST_POSTGRES_URL=$(bash scripts/pg.sh start "$pg_dir")
    export CUSTOS_TEST_POSTGRES_URL
    export CUSTOS_TEST_POSTGRES_PASSWORD_FILE="$pg_dir/password"
fi
cargo test --workspace --lib --tests "$@"
cargo test --workspace --doc
