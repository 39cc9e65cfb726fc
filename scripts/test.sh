#!/usr/bin/env bash
# Quick start, command 2: runs the whole test suite: the unit tests of both
# crates (custos-core and the server), the integration tests on fresh
# SoftHSM tokens, and the doc tests. The PostgreSQL tests use the server at
# CUSTOS_TEST_POSTGRES_URL (password in CUSTOS_TEST_POSTGRES_PASSWORD_FILE,
# and over TLS if CUSTOS_TEST_POSTGRES_CA_FILE names its CA)
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
    export CUSTOS_TEST_POSTGRES_CA_FILE="$pg_dir/ca.pem"
fi
# The stock Python gRPC client the integration tests drive custosd with.
CUSTOS_TEST_PYTHON=$(bash scripts/python-env.sh)
export CUSTOS_TEST_PYTHON
cargo test --workspace --lib --tests "$@"
# The integration suite again with every store on PostgreSQL (a fresh
# database per server). The tests skipped here open the SQLite file itself
# to read or tamper with rows, or (ha::) run on PostgreSQL already above.
CUSTOS_TEST_STORE=postgres cargo test --test integration "$@" -- \
    --skip ha:: \
    --skip ha_kill:: \
    --skip audit::nothing_is_signed_or_stored_while_the_log_cannot_be_written \
    --skip checkpoints::a_rewritten_history_is_a_fork_to_anyone_holding_an_older_checkpoint \
    --skip checkpoints::checkpoints_verify_independently_and_proofs_verify_against_them \
    --skip crash::kill_9_at_random_points_loses_nothing_and_signs_exactly_once
cargo test --workspace --doc
