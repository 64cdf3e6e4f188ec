#!/usr/bin/env bash
# Installs the admin API fuzzer (Schemathesis, pinned with hashes in
# requirements.txt beside this script) into a virtualenv under the
# workspace's target/: target/api-fuzz-venv. Run by .ci/run when the venv is
# missing or its requirements changed; tests/tests/api_fuzz.rs runs the
# venv's `schemathesis`. Idempotent: an up-to-date venv is left alone.
#
# To change the version: edit requirements.in, then regenerate the lock with
#   pip-compile --generate-hashes --strip-extras --allow-unsafe \
#     --no-emit-index-url --no-emit-find-links -o requirements.txt requirements.in
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${SHUYUAN_API_FUZZ_VENV:-$(cd "$here/../.." && pwd)/target/api-fuzz-venv}"
requirements="$here/requirements.txt"
stamp="$venv/requirements.txt"

if [ -x "$venv/bin/schemathesis" ] && cmp -s "$requirements" "$stamp"; then
    exit 0
fi

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "the API fuzzer needs Python 3.10 or newer with venv ($python)" >&2
    exit 1
fi

rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-hashes --no-deps --only-binary=:all: -r "$requirements"
cp "$requirements" "$stamp"
echo "installed $("$venv/bin/schemathesis" --version) in $venv"
