#!/usr/bin/env bash
# Creates (or reuses) the virtualenv the Python client tests run in,
# target/python-env, with tests/python/requirements.txt from PyPI, and
# prints its python interpreter's path. Rebuilt whenever the requirements
# change; delete target/python-env to rebuild it by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=target/python-env
stamp="$env_dir/.requirements"
if ! cmp -s tests/python/requirements.txt "$stamp" 2>/dev/null; then
    echo "python-env: installing tests/python/requirements.txt into $env_dir ..." >&2
    rm -rf "$env_dir"
    if ! python3 -m venv "$env_dir" 2>/dev/null; then
        # Debian's python3 ships venv separately.
        sudo_cmd=""
        [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$env_dir"
    fi
    "$env_dir/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt >&2
    cp tests/python/requirements.txt "$stamp"
fi
echo "$PWD/$env_dir/bin/python"
