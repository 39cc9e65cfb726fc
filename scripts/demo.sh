#!/usr/bin/env bash
# Quick start, command 1: runs custosd --dev on a fresh SoftHSM token and a new
# SQLite store, then drives the withdrawal story with the custos CLI: a small
# withdrawal signed at once, a large one approved by two approvers, and one to
# an address off the allowlist denied with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh

# CUSTOS_BIN names a directory of already-built binaries (the secret-hygiene
# test runs this story with its own build); otherwise build them here.
if [ -n "${CUSTOS_BIN:-}" ]; then
    bin=$CUSTOS_BIN
else
    cargo build --quiet --bins
    bin=target/debug
fi
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
tls="$data_dir/tls"
# Every call presents the client certificate of one dev identity: the
# backend, the admin, the auditor, or an approver (alice, bob).
as_client() {
    local who=$1; shift
    "$bin/custos" --server "$endpoint" --tls-ca "$tls/ca.pem" \
        --tls-cert "$tls/clients/$who.pem" --tls-key "$tls/clients/$who.key" "$@"
}
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
keys="$data_dir/keys"
chain=11155111

echo "== custos wallet list   (the dev wallet 'hot': its key was generated inside the SoftHSM token)"
as_client admin wallet list
echo
echo "== custos policy show   (the genesis policy: auto-sign <= 1 ETH to the allowlist, 2 treasury approvals above, deny the rest)"
as_client admin policy show
echo
echo "== 1. A small withdrawal to an allowlisted exchange address is signed at once"
as_client backend withdrawal create --request-id demo-small --wallet hot --initiator ops \
    --to 0x3535353535353535353535353535353535353535 --value-wei 500000000000000000 --chain-id $chain --nonce 0
echo
echo "== 2. A large one (5 ETH) waits for two treasury approvers"
large=$(as_client backend --json withdrawal create --request-id demo-large --wallet hot --initiator ops \
    --to 0x3535353535353535353535353535353535353535 --value-wei 5000000000000000000 --chain-id $chain --nonce 1)
large_id=$(echo "$large" | field name | sed 's#withdrawals/##')
as_client backend withdrawal get "$large_id"
echo
echo "== custos pending   (what approvers see)"
as_client alice pending
echo
echo "== custos approve $large_id --approver alice   (decodes the transaction locally and checks the intent hash)"
as_client alice approve "$large_id" --approver alice --key "$keys/alice.pem" --yes
echo
echo "== custos approve $large_id --approver bob   (the quorum is met: custos signs)"
as_client bob approve "$large_id" --approver bob --key "$keys/bob.pem" --yes
echo
echo "== 3. A withdrawal to an address that is not on the allowlist is denied, with the reason"
as_client backend withdrawal create --request-id demo-unknown --wallet hot --initiator ops \
    --to 0x7777777777777777777777777777777777777777 --value-wei 100000000000000000 --chain-id $chain --nonce 2
echo
echo "== 4. The auditor: pin the log key, wait for the signed checkpoint, export and verify every entry"
log_key=$(field log_verifier_key < "$ready")
as_client auditor audit key
sleep 3   # dev mode signs a checkpoint once entries have waited 2 s
as_client auditor audit checkpoint > "$data_dir/seen.note"
as_client auditor audit export --out "$data_dir/audit-export"
as_client auditor audit verify --key "$log_key" --dir "$data_dir/audit-export" --previous-checkpoint "$data_dir/seen.note"
echo
kill -TERM "$server"
wait "$server"
trap - EXIT
echo "== custosd stopped cleanly. Everything it created is under $data_dir"
echo "   Serve it again with: $bin/custosd --dev --data-dir $data_dir"
