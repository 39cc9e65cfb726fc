#!/usr/bin/env bash
# Quick start, command 1: runs custosd --dev on a fresh SoftHSM token and a new
# SQLite store, then drives it with the custos CLI as an admin would.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh

cargo build --quiet --bins
bin=target/debug
data_dir="${CUSTOS_DEMO_DIR:-$(mktemp -d /tmp/custos-demo.XXXXXX)}"
ready="$data_dir.ready.json"
log="$data_dir.log"

"$bin/custosd" --dev --data-dir "$data_dir" --listen 127.0.0.1:0 >"$ready" 2>"$log" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
    [ -s "$ready" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
done
endpoint=$(sed -n 's/.*"endpoint":"\([^"]*\)".*/\1/p' "$ready")
[ -n "$endpoint" ] || { echo "custosd did not report its endpoint" >&2; cat "$log" >&2; exit 1; }

echo "== custosd --dev is listening on $endpoint"
echo "   ready line: $(cat "$ready")"
echo
echo "== custos wallet create treasury-hot   (key generated inside the SoftHSM token)"
"$bin/custos" --server "$endpoint" wallet create treasury-hot --display-name "Treasury hot wallet"
echo
echo "== custos wallet list"
"$bin/custos" --server "$endpoint" wallet list
echo

kill -TERM "$server"
wait "$server"
trap - EXIT
echo "== custosd stopped cleanly. Everything it created is under $data_dir"
echo "   Serve it again with: $bin/custosd --dev --data-dir $data_dir"
