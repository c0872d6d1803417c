#!/usr/bin/env bash
# The whole kmsfs test suite, as CI runs it:
#   setup -> cargo fmt --check -> cargo clippy -D warnings -> cargo test --release
#   (including the randomized model test, tests/model.rs, and the multi-node
#   tests, tests/shared.rs, which bring GlusterFS up with scripts/dev-gluster.sh)
#   -> the filesystem-core tests again as an unprivileged user without /dev/fuse
#   -> the Python package, built from source, on a volume written through a mount
#   -> the fuzz targets, 10 s each (scripts/fuzz.sh)
#   -> pjdfstest on a real kmsfs mount
#   -> stress-ng (filesystem class), dbench and fio --verify on a real kmsfs
#      mount (scripts/stress.sh, about 5 minutes).
# Every step runs even if an earlier one failed (setup aside), so one run shows
# every problem; the exit status is non-zero if any step failed.
#
# Needs root and /dev/fuse: the integration tests and pjdfstest mount real
# FUSE file systems, and fail (not skip) when they cannot.
#
# KMSFS_SKIP_PJDFSTEST=1 and KMSFS_SKIP_STRESS=1 skip the pjdfstest and stress
# steps for quick local iteration; they are ignored when CI=true.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KMSFS_ROOT"

names=() results=() times=()
failed=0 passed=0 skipped=0

banner() { printf '\n======== %s ========\n' "$*"; }

run_step() {
    local name=$1 start rc
    shift
    banner "$name: $*"
    start=$SECONDS
    set +e
    "$@"
    rc=$?
    set -e
    names+=("$name")
    times+=("$((SECONDS - start))s")
    if ((rc == 0)); then
        results+=("ok")
        passed=$((passed + 1))
    else
        results+=("FAILED (exit $rc)")
        failed=$((failed + 1))
        echo "test.sh: step '$name' failed with exit $rc" >&2
    fi
}

skip_step() {
    banner "$1: skipped ($2)"
    names+=("$1") results+=("skipped: $2") times+=("-")
    skipped=$((skipped + 1))
}

if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: warning: not root; the FUSE integration tests and pjdfstest need root and will fail" >&2
fi

banner "setup: scripts/setup.sh"
# The loop-disk tests (tests/faults.rs, tests/crash.rs) make ext4 and btrfs
# images and run stress-ng; the multi-node tests (tests/shared.rs) run two
# nodes over a GlusterFS volume (scripts/dev-gluster.sh). They install these
# themselves when run alone.
if ! KMSFS_SETUP_EXTRA_APT="${KMSFS_SETUP_EXTRA_APT:-} e2fsprogs btrfs-progs stress-ng glusterfs-server glusterfs-client" bash scripts/setup.sh; then
    echo "test.sh: setup failed; nothing else can run" >&2
    echo "steps: 0 passed, 1 failed"
    exit 1
fi
export KMSFS_SETUP_DONE=1

run_step fmt cargo fmt --check
run_step clippy cargo clippy --all-targets -- -D warnings
run_step test cargo test --release
run_step core-nofuse bash scripts/test-core-unprivileged.sh
run_step python bash scripts/test-python.sh
run_step fuzz bash scripts/fuzz.sh 10

# A long step that $1 (an environment variable) set to 1 skips, except in CI.
long_step() {
    local skip_var=$1 name=$2 what=$3
    shift 3
    local skip=${!skip_var:-0}
    if [[ ${CI:-} == true && $skip == 1 ]]; then
        echo "test.sh: CI=true: ignoring $skip_var=1; $what always runs in CI" >&2
        skip=0
    fi
    if [[ $skip == 1 ]]; then
        skip_step "$name" "$skip_var=1 (local only)"
    else
        run_step "$name" "$@"
    fi
}
long_step KMSFS_SKIP_PJDFSTEST pjdfstest pjdfstest bash scripts/pjdfstest.sh
long_step KMSFS_SKIP_STRESS stress "the stress step" bash scripts/stress.sh

banner "summary"
for i in "${!names[@]}"; do
    printf '  %-12s %-8s %s\n' "${names[$i]}" "${times[$i]}" "${results[$i]}"
done
if ((skipped)); then
    echo "steps: $passed passed, $failed failed, $skipped skipped"
else
    echo "steps: $passed passed, $failed failed"
fi
((failed == 0))
