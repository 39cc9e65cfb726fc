#!/usr/bin/env bash
# Creates a fresh SoftHSMv2 token for custos in DIR and a custosd config for it.
#
#   hsm-config/create-softhsm-token.sh DIR [LABEL]
#
# PINs come from $SO_PIN and $USER_PIN, or are generated. They are written to
# DIR/so.pin and DIR/user.pin with mode 0600 (never printed). Afterwards:
#
#   SOFTHSM2_CONF=DIR/softhsm2.conf custosd --config DIR/custosd.toml
set -euo pipefail

dir=${1:?usage: create-softhsm-token.sh DIR [LABEL]}
label=${2:-custos}
here=$(cd "$(dirname "$0")" && pwd)
module=${PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

command -v softhsm2-util >/dev/null || bash "$here/../scripts/ensure-deps.sh"
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
[ -e "$dir/user.pin" ] && { echo "$dir already holds a token (user.pin exists)" >&2; exit 1; }

sed "s|@TOKEN_DIR@|$dir/tokens|" "$here/softhsm2.conf.template" >"$dir/softhsm2.conf"
umask 077
so_pin=${SO_PIN:-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}
user_pin=${USER_PIN:-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}
printf '%s' "$so_pin" >"$dir/so.pin"
printf '%s' "$user_pin" >"$dir/user.pin"

# softhsm2-util takes PINs only as arguments or at a prompt; this is a dev tool.
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free \
    --label "$label" --so-pin "$so_pin" --pin "$user_pin" >/dev/null

cat >"$dir/custosd.toml" <<TOML
[server]
listen = "127.0.0.1:50051"

[hsm]
module = "$module"
token_label = "$label"
pin_file = "$dir/user.pin"
sessions = 4

[store]
path = "$dir/custos.db"

[bitcoin]
network = "regtest"
TOML
echo "token '$label' created; add [tls] and [[clients]] to $dir/custosd.toml (see hsm-config/custosd.example.toml), then run: SOFTHSM2_CONF=$dir/softhsm2.conf custosd --config $dir/custosd.toml"
echo "(for a first local try without certificates: append --insecure-plaintext; loopback only)"
