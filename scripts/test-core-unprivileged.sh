#!/usr/bin/env bash
# Runs the filesystem-core tests (tests/core.rs) and the library's no-FUSE
# tests (tests/library.rs, `nofuse_*`: the library API, cat, export and
# import) the way a machine without FUSE would: as an unprivileged user, in
# a mount namespace where /dev/fuse does not exist. They drive `Core`
# directly, so they must pass there; this proves it instead of assuming it. Needs root (to drop to `nobody` and to
# make the namespace) and util-linux's unshare and setpriv.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KMSFS_ROOT"

[[ $(id -u) -eq 0 ]] || { echo "test-core-unprivileged: needs root to drop privileges" >&2; exit 1; }

# The test binaries (core, library) and the kmsfs binary the library tests
# run, built here and copied where `nobody` can reach them.
artifacts=$(cargo test --release --test core --test library --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] in ("core", "library") and m.get("executable"):
        print(m["target"]["name"], m["executable"])')
core_bin=$(awk '$1 == "core" {print $2}' <<<"$artifacts")
library_bin=$(awk '$1 == "library" {print $2}' <<<"$artifacts")
[[ -x $core_bin && -x $library_bin ]] || { echo "test-core-unprivileged: could not build the core and library tests" >&2; exit 1; }
kmsfs_build

work=$(mktemp -d /tmp/kmsfs-core-XXXXXX)
trap 'rm -rf "$work"' EXIT
cp "$core_bin" "$work/core-tests"
cp "$library_bin" "$work/library-tests"
cp "$KMSFS" "$work/kmsfs"
chmod 0755 "$work" "$work/core-tests" "$work/library-tests" "$work/kmsfs"
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
        sh -c "set -e
               test ! -e /dev/fuse || { echo \"/dev/fuse is still there\" >&2; exit 1; }
               echo \"core tests as uid \$(id -u), no /dev/fuse\"
               ./core-tests --test-threads=2
               echo \"library tests without FUSE as uid \$(id -u), no /dev/fuse\"
               KMSFS_TEST_BIN=$work/kmsfs exec ./library-tests --test-threads=2 nofuse_"
' sh "$work"
