#!/usr/bin/env bash
# Builds the Python package (python/) from source into a virtualenv and runs
# its tests (python/tests): a volume written through a real kmsfs mount,
# read back in Python without it. Then reads 200 files with
# scripts/bench/python_read.py, in Python and through a mount, as a smoke
# test of the benchmark.
#
# Needs root and /dev/fuse (the tests write through a mount). Installs
# python3-venv with apt-get if `python3 -m venv` does not work, and maturin
# and numpy from PyPI into the virtualenv ($KMSFS_PYTHON_VENV, default
# ~/.cache/kmsfs-python-venv, outside the clone like the cargo target dir).
# The native module builds in $CARGO_TARGET_DIR, where the kmsfs build
# already is: only PyO3 and the binding compile.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KMSFS_ROOT"

die() { echo "test-python: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root: the tests write the volume through a FUSE mount"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing: the tests write the volume through a FUSE mount"

kmsfs_build
export KMSFS

venv=${KMSFS_PYTHON_VENV:-$HOME/.cache/kmsfs-python-venv}
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv"; then
        echo "test-python: python3 -m venv failed; installing python3-venv" >&2
        rm -rf "$venv"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null ||
            die "could not install python3-venv"
        python3 -m venv "$venv" || die "python3 -m venv failed"
    fi
fi
python=$venv/bin/python
# maturin's build backend runs the `maturin` on PATH.
export PATH=$venv/bin:$PATH
"$python" -m pip install --quiet --disable-pip-version-check 'maturin>=1.9.4,<2' numpy ||
    die "could not install maturin and numpy from PyPI"

# As a user would (pip install ./python), with the virtualenv's maturin
# rather than a fresh isolated build environment each run.
echo "test-python: pip install ./python (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
start=$SECONDS
"$python" -m pip install --quiet --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./python ||
    die "pip install ./python failed"
echo "test-python: built and installed in $((SECONDS - start))s"

# From the repository root, so `import kmsfs` finds the installed package
# (python/kmsfs has no native module).
"$python" -m unittest discover --start-directory python/tests --pattern 'test_*.py' --verbose

echo "test-python: benchmark smoke test (200 files)"
"$python" scripts/bench/python_read.py --files 200 --procs 2 --kmsfs "$KMSFS"
