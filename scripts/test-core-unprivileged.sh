#!/usr/bin/env bash
# Runs the filesystem-core tests (tests/core.rs) the way a machine without
# FUSE would: as an unprivileged user, in a mount namespace where /dev/fuse
# does not exist. They drive `Core` directly, so they must pass there; this
# proves it instead of assuming it. Needs root (to drop to `nobody` and to
# make the namespace) and util-linux's unshare and setpriv.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KMSFS_ROOT"

[[ $(id -u) -eq 0 ]] || { echo "test-core-unprivileged: needs root to drop privileges" >&2; exit 1; }

bin=$(cargo test --release --test core --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "core" and m.get("executable"):
        print(m["executable"])')
[[ -x $bin ]] || { echo "test-core-unprivileged: could not build the core tests" >&2; exit 1; }

work=$(mktemp -d /tmp/kmsfs-core-XXXXXX)
trap 'rm -rf "$work"' EXIT
cp "$bin" "$work/core-tests"
chmod 0755 "$work" "$work/core-tests"
chown nobody "$work"

# A private mount namespace whose /dev holds only null, zero, random and
# urandom (no /dev/fuse), then the tests as `nobody` with no capabilities.
mkdir "$work/dev.old"
unshare --mount --propagation private -- sh -c '
    set -e
    work=$1
    mount --bind /dev "$work/dev.old"
    mount -t tmpfs -o mode=0755 none /dev
    for n in null zero random urandom; do
        touch "/dev/$n"
        mount --bind "$work/dev.old/$n" "/dev/$n"
    done
    umount -l "$work/dev.old"
    cd "$work"
    exec setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all \
        env -i PATH=/usr/bin:/bin TMPDIR="$work" HOME="$work" RUST_BACKTRACE=1 \
        sh -c "test ! -e /dev/fuse || { echo \"/dev/fuse is still there\" >&2; exit 1; }
               echo \"core tests as uid \$(id -u), no /dev/fuse\"
               exec ./core-tests --test-threads=2"
' sh "$work"
