#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests, nothing done by hand:
#   scripts/pg.sh start DIR   initdb in DIR, start on a random loopback port,
#                             print the connection URL (also in DIR/url)
#   scripts/pg.sh stop DIR    stop it (DIR is left for the caller to remove)
#   scripts/pg.sh restart DIR stop and start again on the same port
# Installs Debian's `postgresql` package if no server is found. initdb refuses
# to run as root, so a root caller runs the cluster as the `postgres` system
# user the package creates. Authentication is scram-sha-256 with a random
# password, over TCP on 127.0.0.1 only; the password lives in DIR/password
# (mode 0600), which is how custos reads it too. The server also speaks TLS
# with a certificate for 127.0.0.1 and localhost, signed by a throwaway CA
# whose certificate is DIR/ca.pem (custos's store.ca_file).
set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "pg.sh: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

bindir() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$found" ] || [ ! -x "$found/initdb" ]; then
        echo "pg.sh: installing postgresql ..." >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        found=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    fi
    echo "$found"
}

# Runs a server binary as the cluster's owner.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# A throwaway CA (DIR/ca.pem) and a server certificate it signs, for
# 127.0.0.1 and localhost, placed in the data directory as PostgreSQL wants:
# owned by the server's user, the key readable by nobody else.
make_tls() {
    local dir="$1" tls="$1/tls"
    if ! command -v openssl >/dev/null; then
        echo "pg.sh: installing openssl ..." >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
    fi
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=custos test database CA" -keyout "$tls/ca.key" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=localhost" -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$tls/server.ext"
    openssl x509 -req -in "$tls/server.csr" -CA "$dir/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial -CAserial "$tls/ca.srl" \
        -days 30 -extfile "$tls/server.ext" -out "$tls/server.crt" 2>/dev/null
    cp "$tls/server.crt" "$tls/server.key" "$dir/data/"
    chmod 600 "$dir/data/server.key" "$tls/ca.key"
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir/data/server.crt" "$dir/data/server.key"; fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir="$1" bin port password fresh=""
    bin=$(bindir)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        password=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
        (umask 077 && printf '%s' "$password" >"$dir/password")
        mkdir -p "$dir/data" "$dir/run"
        if [ "$(id -u)" -eq 0 ]; then
            chown postgres "$dir" "$dir/data" "$dir/run"
            chmod 755 "$dir"
            # The owner reads the password to set it; nobody else does.
            cp "$dir/password" "$dir/data.pw" && chown postgres "$dir/data.pw"
        else
            cp "$dir/password" "$dir/data.pw"
        fi
        as_owner "$bin/initdb" -D "$dir/data" -U custos --auth=scram-sha-256 \
            --pwfile="$dir/data.pw" -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1
        rm -f "$dir/data.pw"
        make_tls "$dir"
        free_port >"$dir/port"
        fresh=1
    fi
    port=$(cat "$dir/port")
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir/run -c fsync=on -c synchronous_commit=on -c max_connections=200 -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key" \
        >/dev/null
    if [ -n "${fresh:-}" ]; then
        as_owner env PGPASSWORD="$(cat "$dir/password")" "$bin/createdb" -h 127.0.0.1 -p "$port" -U custos custos_test
    fi
    echo "postgres://custos@127.0.0.1:$port/custos_test" | tee "$dir/url"
}

stop() {
    local dir="$1" bin
    bin=$(bindir)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
}

case "${1:-}" in
    start) start "$2" ;;
    stop) stop "$2" ;;
    restart) stop "$2"; start "$2" >/dev/null ;;
    *) echo "usage: scripts/pg.sh start|stop|restart DIR" >&2; exit 2 ;;
esac
