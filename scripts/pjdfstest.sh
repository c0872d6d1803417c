#!/usr/bin/env bash
# Runs the POSIX file-system suite pjdfstest (Rust rewrite, crates.io
# `pjdfstest`) against a fresh kmsfs mount made with -o allow_other, or, for
# comparison, against a peer encrypted file system.
#
# Usage: bash scripts/pjdfstest.sh [--peer kmsfs|gocryptfs]
#                                  [--known-failures FILE] [--timeout SECONDS]
#                                  [--keep] [-- TEST_PATTERN...]
#
# Exits 0 when every test that failed is listed in the known-failures file
# (default for kmsfs: scripts/pjdfstest-known-failures.txt; for a peer: none),
# 1 otherwise. The mount is always torn down on exit; the full pjdfstest
# output is kept in /tmp/kmsfs-pjdfstest-PEER.log (and the file system
# daemon's log, if any, in /tmp/kmsfs-pjdfstest-PEER-daemon.log).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PEER=kmsfs
KNOWN=
KNOWN_SET=0
KEEP=0
TIMEOUT=${KMSFS_PJDFSTEST_TIMEOUT:-900}
PATTERNS=()

usage() { sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
die() { printf 'pjdfstest.sh: error: %s\n' "$*" >&2; exit 2; }
log() { printf 'pjdfstest.sh: %s\n' "$*"; }

while (($#)); do
    case $1 in
        --peer) PEER=${2:?--peer needs a name}; shift 2 ;;
        --peer=*) PEER=${1#*=}; shift ;;
        --known-failures) KNOWN=${2:?--known-failures needs a file}; KNOWN_SET=1; shift 2 ;;
        --known-failures=*) KNOWN=${1#*=}; KNOWN_SET=1; shift ;;
        --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; PATTERNS=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $PEER in
    kmsfs|gocryptfs) ;;
    *) die "unsupported --peer '$PEER' (kmsfs or gocryptfs)" ;;
esac
if ((!KNOWN_SET)) && [[ $PEER == kmsfs ]]; then
    KNOWN=$KMSFS_ROOT/scripts/pjdfstest-known-failures.txt
fi
[[ -z $KNOWN || -f $KNOWN ]] || die "known-failures file $KNOWN does not exist"
[[ $(id -u) -eq 0 ]] || die "must run as root: pjdfstest switches users and tests chown"

# --- machine set-up --------------------------------------------------------
if [[ ${KMSFS_SETUP_DONE:-0} != 1 ]]; then
    bash "$KMSFS_ROOT/scripts/setup.sh"
fi
if [[ $PEER == gocryptfs ]] && ! command -v gocryptfs >/dev/null 2>&1; then
    KMSFS_SETUP_EXTRA_APT=gocryptfs bash "$KMSFS_ROOT/scripts/setup.sh"
fi
command -v pjdfstest >/dev/null 2>&1 || die "pjdfstest is not installed (run scripts/setup.sh)"

# pjdfstest switches to two unprivileged users, each with its own group.
ensure_user() {
    local u=$1
    if ! getent group "$u" >/dev/null; then
        log "creating group $u"
        groupadd "$u"
    fi
    if ! getent passwd "$u" >/dev/null; then
        log "creating user $u (pjdfstest dummy user)"
        useradd -M -N -g "$u" -d /nonexistent -s /usr/sbin/nologin -c "pjdfstest dummy user" "$u"
    fi
}
ensure_user tests
ensure_user pjdfstest

if [[ $PEER == kmsfs ]]; then
    kmsfs_build
fi

# --- fresh file system ------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kmsfs-pjdfstest.XXXXXX")
MNT=$WORK/mnt
SECONDARY=$WORK/secondary
CONF=$WORK/pjdfstest.toml
OUT=${TMPDIR:-/tmp}/kmsfs-pjdfstest-$PEER.log
DAEMON_LOG=$WORK/$PEER.log
PJD_PID=

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    cd /
    if [[ -n $PJD_PID ]] && kill -0 "$PJD_PID" 2>/dev/null; then
        echo "pjdfstest.sh: stopping pjdfstest (pid $PJD_PID)" >&2
        kill -TERM "$PJD_PID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$PJD_PID" 2>/dev/null || break; sleep 0.5; done
    fi
    if is_mounted "$MNT"; then
        if ! force_unmount "$MNT"; then
            echo "pjdfstest.sh: warning: could not unmount $MNT" >&2
            if ((rc == 0)); then rc=1; fi
        fi
    fi
    if [[ -s $DAEMON_LOG ]]; then
        cp -f -- "$DAEMON_LOG" "${OUT%.log}-daemon.log" 2>/dev/null || true
    fi
    if ((KEEP)); then
        echo "pjdfstest.sh: kept $WORK"
    elif ! is_mounted "$MNT"; then
        rm -rf -- "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Other users must be able to reach the mount point.
chmod 0755 "$WORK"
mkdir -p "$MNT" "$SECONDARY"
chmod 0755 "$MNT" "$SECONDARY"

case $PEER in
    kmsfs)
        log "mounting a fresh kmsfs at $MNT (-o allow_other)"
        # A trusted configuration of this run's own, not /etc/kmsfs's.
        kmsfs_init_and_mount "$WORK/backing" pjdfstest "$MNT" "$DAEMON_LOG" -o allow_other ||
            die "could not make a kmsfs mount to test"
        ;;
    gocryptfs)
        log "mounting a fresh gocryptfs $(gocryptfs -version | head -n1 | awk '{print $2}' | tr -d ';') at $MNT (-allow_other)"
        mkdir -p "$WORK/cipher"
        gocryptfs -init -q -extpass "echo pw" "$WORK/cipher" >/dev/null
        gocryptfs -q -nosyslog -extpass "echo pw" -allow_other "$WORK/cipher" "$MNT"
        ;;
esac
is_mounted "$MNT" || die "$PEER reported success but $MNT is not mounted"
chmod 0755 "$MNT"

# naptime: the sleep between changes whose timestamps must differ.
{
    echo "[features]"
    echo "utimensat = {}"
    echo "utime_now = {}"
    echo "posix_fallocate = {}"
    echo
    echo "[settings]"
    echo "naptime = 0.05"
    echo "allow_remount = false"
    echo
    echo "[dummy_auth]"
    echo "entries = [[\"tests\", \"$(id -gn tests)\"], [\"pjdfstest\", \"$(id -gn pjdfstest)\"]]"
} >"$CONF"

# --- run --------------------------------------------------------------------
log "running pjdfstest on $PEER (${#PATTERNS[@]} patterns; timeout ${TIMEOUT}s; log $OUT)"
start=$SECONDS
set +e
# In the background, so that Ctrl-C or a TERM reaches our trap at once.
(cd / && exec env NO_COLOR=1 CLICOLOR=0 RUST_BACKTRACE=0 timeout --kill-after=30 "$TIMEOUT" \
    pjdfstest -c "$CONF" -p "$MNT" -s "$SECONDARY" -- "${PATTERNS[@]}") >"$OUT" 2>&1 &
PJD_PID=$!
wait "$PJD_PID"
prc=$?
PJD_PID=
set -e
elapsed=$((SECONDS - start))
# Strip colours, should any slip through.
sed -i 's/\x1b\[[0-9;]*m//g' "$OUT"

# --- report -------------------------------------------------------------------
declare -A known=()
if [[ -n $KNOWN ]]; then
    while IFS= read -r line; do
        line=${line%%#*}
        line=$(echo "$line" | xargs)
        [[ -n $line ]] && known[$line]=1
    done <"$KNOWN"
fi

passed=0 failed=0 skipped=0 allowed=0
new_failures=() allowed_failures=()
declare -A seen_fail=()
while IFS= read -r line; do
    name=${line%% *}
    status=$(echo "${line#"$name"}" | xargs)
    case $status in
        ok) passed=$((passed + 1)) ;;
        skipped) skipped=$((skipped + 1)) ;;
        FAILED)
            seen_fail[$name]=1
            if [[ -n ${known[$name]:-} ]]; then
                allowed=$((allowed + 1)); allowed_failures+=("$name")
            else
                failed=$((failed + 1)); new_failures+=("$name")
            fi
            ;;
    esac
done < <(grep -E '^[A-Za-z_][A-Za-z0-9_:]* +(ok|FAILED|skipped)$' "$OUT")

echo
echo "pjdfstest on $PEER: $passed passed, $((failed + allowed)) failed, $skipped skipped in ${elapsed}s (pjdfstest exit $prc)"
pj_summary=$(grep -E '^Summary:' "$OUT" | tail -n1 || true)
[[ -n $pj_summary ]] && echo "  pjdfstest's own line: $pj_summary"

if ((${#new_failures[@]})); then
    echo
    echo "Failures not in the known-failures list${KNOWN:+ ($KNOWN)}:"
    for name in "${new_failures[@]}"; do
        echo "  $name"
        # The lines pjdfstest prints under a failed test (indented).
        awk -v n="$name" '
            $1 == n && $NF == "FAILED" { on = 1; next }
            on && /^[\t ]/ { print "      " $0; next }
            { on = 0 }' "$OUT" | head -n 8
    done
fi
if ((${#new_failures[@]})) && [[ -s $DAEMON_LOG ]]; then
    echo
    echo "Last lines of the $PEER daemon log (kept in ${OUT%.log}-daemon.log):"
    tail -n 15 "$DAEMON_LOG" | sed 's/^/    /'
fi
if ((${#allowed_failures[@]})); then
    echo
    echo "Known failures (allowed by $KNOWN): ${allowed_failures[*]}"
fi
stale=()
for name in "${!known[@]}"; do
    if [[ -z ${seen_fail[$name]:-} ]] && grep -qE "^$name +ok$" "$OUT"; then
        stale+=("$name")
    fi
done
if ((${#stale[@]})); then
    echo
    echo "Note: listed as known failures but now pass (remove them from $KNOWN): ${stale[*]}"
fi

status=0
if ((prc == 124 || prc == 137)); then
    echo "pjdfstest timed out after ${TIMEOUT}s; last lines:" >&2
    tail -n 5 "$OUT" >&2
    status=1
elif [[ -z $pj_summary ]]; then
    echo "pjdfstest did not finish (exit $prc); last lines:" >&2
    tail -n 20 "$OUT" >&2
    status=1
elif ((passed == 0)); then
    echo "pjdfstest ran no test" >&2
    status=1
fi
if ((failed > 0)); then
    status=1
fi
if ((status == 0)); then
    echo "pjdfstest on $PEER: OK"
else
    echo "pjdfstest on $PEER: FAILED"
fi
exit "$status"
