#!/usr/bin/env bash
# Installs what custos needs to build and run that a fresh machine may lack:
# SoftHSMv2 (the PKCS#11 token used by dev mode and the tests). Idempotent.
# `--fuzz` and `--lint` install what only the fuzz run and CI's lints need.
set -euo pipefail

module="${TEST_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "ensure-deps: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

# `--fuzz` (from scripts/fuzz.sh only, so the Quick start never pays for it):
# cargo-fuzz, a C++ compiler for libFuzzer, and python3 for the seeds.
ensure_fuzz_deps() {
    if ! command -v c++ >/dev/null || ! command -v python3 >/dev/null; then
        echo "ensure-deps: installing g++ and python3 for fuzzing ..." >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ python3 >/dev/null
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "ensure-deps: installing cargo-fuzz ..." >&2
        cargo install cargo-fuzz --locked
    fi
}

# `--lint` (from .ci/run): cargo-deny, for the licence, ban and source checks.
ensure_lint_deps() {
    if ! cargo deny --version >/dev/null 2>&1; then
        echo "ensure-deps: installing cargo-deny ..." >&2
        cargo install cargo-deny --locked
    fi
}

if [ "${1:-}" = "--fuzz" ]; then
    ensure_fuzz_deps
    exit 0
fi
if [ "${1:-}" = "--lint" ]; then
    ensure_lint_deps
    exit 0
fi

if [ ! -f "$module" ] || ! command -v softhsm2-util >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "ensure-deps: SoftHSMv2 is missing and this is not a Debian/Ubuntu system;" >&2
        echo "ensure-deps: install softhsm2 with your package manager, or set TEST_PKCS11_MODULE" >&2
        exit 1
    fi
    echo "ensure-deps: installing softhsm2 ..." >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
fi

if ! command -v python3 >/dev/null; then
    # The intent-format test runs an independent Python implementation.
    echo "ensure-deps: installing python3 ..." >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
fi

if ! python3 -c "import cryptography" 2>/dev/null; then
    # The checkpoint test verifies signed notes with an independent Python
    # implementation built on the `cryptography` package.
    echo "ensure-deps: installing the Python cryptography package ..." >&2
    python3 -m pip install --quiet cryptography 2>/dev/null || {
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-cryptography >/dev/null
    }
fi

if ! command -v cargo >/dev/null; then
    echo "ensure-deps: cargo not found; custos needs a Rust toolchain >= 1.85 (https://rustup.rs)" >&2
    exit 1
fi
