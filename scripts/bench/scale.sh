#!/usr/bin/env bash
# scale.sh — many small files and two nodes: what creating N files costs,
# and what a cold read of all of them by two nodes at once costs, per KMS
# and per key mode, with the KMS requests counted where the server sees
# them. See docs/BENCHMARKS.md ("Scale: many files, two nodes").
#
# Usage: bash scripts/bench/scale.sh [--quick | --files N] [--kms local,vault,aws]
#            [--modes per-file,per-file-nopool,directory] [--gluster]
#            [--readers-opts OPTS] [--procs N] [--workdir DIR] [--out DIR]
#   --files N       files to create, 4 KiB each, 1,000 per directory (default 20000)
#   --quick         --files 2000; marked QUICK in the output
#   --kms           local (keyring file), vault (dev OpenBao, scripts/dev-vault.sh),
#                   aws (moto, scripts/dev-moto.sh); default all three
#   --modes         per-file: `kmsfs init` defaults, mount defaults (DEK pool on);
#                   per-file-nopool: the same mounted with -o dek_pool=0;
#                   directory: `kmsfs init --key-mode directory`;
#                   default all three
#   --gluster       the backing directory on GlusterFS (scripts/dev-gluster.sh):
#                   the writer and node A over client mount 1, node B over
#                   client mount 2; default: one local backing directory
#   --readers-opts  -o options of the two reading nodes (default ro,shared:
#                   the read-only fleet mode; `shared` for read-write nodes)
#   --procs N       reader processes per node (default 4)
#   --workdir DIR   scratch space (default /var/tmp/kmsfs-scale)
#   --out DIR       results: latest.jsonl, latest.txt, latest.md (default WORKDIR/results)
#
# For each KMS and mode: (a) a fresh volume, one mount, N files
# created by one process (scripts/bench/ml_files.py create), timed; then
# unmounted. (b) page caches dropped (echo 3 > drop_caches), two fresh
# mounts (new processes: cold DEK caches) read every file whole at the same
# time, each with --procs processes in a shuffled order; each node's wall
# time is its own. KMS requests: for vault, request entries on transit/
# paths in the dev server's file audit log (a batch is one request), split
# per node by the token each node mounts with (display name token-scale-*); for
# aws, POST lines in moto's access log (every KMS action is one POST);
# for local (no server), what the daemons' /metrics count. The creates'
# window runs from before the mount to after the unmount, so it includes
# the mount's own requests (the volume configuration's key). Each node's
# requests as it sent them come from its /metrics too.
#
# Needs root (drop_caches, FUSE). A step that fails (an option this build
# lacks, a KMS that does not start) is an ERROR cell; the rest still runs.
# KMSFS_BIN benchmarks a given binary instead of building.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=scripts/lib.sh
source "$BENCH_DIR/../lib.sh"

FILES=20000 QUICK=0 KMSS=local,vault,aws MODES=per-file,per-file-nopool,directory
GLUSTER=0 READERS_OPTS=ro,shared PROCS=4 WORKDIR=/var/tmp/kmsfs-scale OUT= FILES_SET=0
FILE_SIZE=4096
STEP_TIMEOUT=${KMSFS_BENCH_STEP_TIMEOUT:-2400}

usage() { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "scale: error: $*" >&2; exit 1; }
log() { printf '[scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

while (($#)); do
    case $1 in
    --files) FILES=${2:?--files needs a number}; FILES_SET=1; shift ;;
    --files=*) FILES=${1#*=}; FILES_SET=1 ;;
    --quick) QUICK=1 ;;
    --kms) KMSS=${2:?--kms needs a list}; shift ;;
    --kms=*) KMSS=${1#*=} ;;
    --modes) MODES=${2:?--modes needs a list}; shift ;;
    --modes=*) MODES=${1#*=} ;;
    --gluster) GLUSTER=1 ;;
    --readers-opts) READERS_OPTS=${2:?--readers-opts needs options}; shift ;;
    --readers-opts=*) READERS_OPTS=${1#*=} ;;
    --procs) PROCS=${2:?--procs needs a number}; shift ;;
    --procs=*) PROCS=${1#*=} ;;
    --workdir) WORKDIR=${2:?--workdir needs a directory}; shift ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --out=*) OUT=${1#*=} ;;
    -h | --help) usage 0 ;;
    *) echo "scale: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done
((QUICK && !FILES_SET)) && FILES=2000
[[ $FILES =~ ^[1-9][0-9]*$ ]] || die "--files must be a positive integer"
[[ $PROCS =~ ^[1-9][0-9]*$ ]] || die "--procs must be a positive integer"
for k in ${KMSS//,/ }; do case $k in local | vault | aws) ;; *) die "unknown KMS $k (local,vault,aws)" ;; esac; done
for m in ${MODES//,/ }; do case $m in per-file | per-file-nopool | directory) ;; *) die "unknown mode $m (per-file,per-file-nopool,directory)" ;; esac; done
[[ $(id -u) == 0 ]] || die "run as root (drop_caches and FUSE mounts need it)"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"
command -v curl >/dev/null || die "curl is missing (apt-get install curl)"

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd -P)
OUT=${OUT:-$WORKDIR/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd -P)
RUN=$WORKDIR/run
MOUNTS_FILE=$WORKDIR/.mounts
RAW=$RUN/raw.jsonl
export KMSFS_CONFIG=$RUN/kmsfs.toml
STARTED_VAULT=0 STARTED_MOTO=0 STARTED_GLUSTER=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_listed "$MOUNTS_FILE"
    ((STARTED_VAULT)) && { bash "$KMSFS_ROOT/scripts/dev-vault.sh" stop "$RUN/vault" >/dev/null 2>&1 || true; }
    ((STARTED_MOTO)) && { bash "$KMSFS_ROOT/scripts/dev-moto.sh" stop "$RUN/moto" >/dev/null 2>&1 || true; }
    if ((STARTED_GLUSTER)); then
        rm -rf "${GLUSTER_BASE:?}" 2>/dev/null || true
        bash "$KMSFS_ROOT/scripts/dev-gluster.sh" down "$RUN/gluster" >/dev/null 2>&1 || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Mounts a killed earlier run left behind.
unmount_listed "$MOUNTS_FILE"
if [[ -e $RUN ]]; then
    [[ -f $RUN/.kmsfs-scale-run ]] || die "$RUN exists and was not made by this script; choose another --workdir"
    if [[ -d $RUN/gluster ]]; then bash "$KMSFS_ROOT/scripts/dev-gluster.sh" down "$RUN/gluster" >/dev/null 2>&1 || true; fi
    grep -q " $RUN/" /proc/self/mounts && die "something is still mounted below $RUN"
    rm -rf "$RUN"
fi
mkdir -p "$RUN/bin"
: >"$RUN/.kmsfs-scale-run"
: >"$RAW"

# A private copy of the binary: other builds share the target directory.
if [[ -n ${KMSFS_BIN:-} ]]; then KMSFS_BIN=$(abs_path "$KMSFS_BIN"); else log "building kmsfs"; fi
kmsfs_build >&2 || die "building kmsfs failed"
cp -f "$KMSFS" "$RUN/bin/kmsfs"
KMSFS=$RUN/bin/kmsfs

# ---------------------------------------------------------------- helpers
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# rec KMS MODE FIELD VALUE / rec_err KMS MODE STEP MESSAGE
rec() { printf '{"kms":"%s","mode":"%s","field":"%s","value":%s}\n' "$1" "$2" "$3" "$4" >>"$RAW"; }
rec_err() {
    log "ERROR $1 $2 $3: $4"
    printf '{"kms":"%s","mode":"%s","field":"%s","error":%s}\n' "$1" "$2" "$3" "$(json_str "$4")" >>"$RAW"
}

# The first error line of log $1 (else its last line), for a record.
first_error() { { grep -m1 -i 'error' "$1" || tail -n 1 "$1"; } 2>/dev/null | cut -c1-300; }

# Total KMS requests a daemon sent, from its /metrics on port $1.
sent_requests() {
    curl -fsS --max-time 10 "http://127.0.0.1:$1/metrics" |
        awk '/^kmsfs_kms_requests_total\{/ { t += $NF } END { printf "%d\n", t }'
}

# Requests the KMS server has seen so far: a byte offset into its log,
# which server_count then counts from.
server_mark() {
    case $1 in
    vault) stat -c %s "$KMSFS_VAULT_AUDIT" ;;
    aws) stat -c %s "$RUN/moto/moto.log" ;;
    local) echo 0 ;;
    esac
}

# server_count KMS OFFSET [DISPLAY_NAME]: requests since OFFSET (vault:
# transit requests, optionally only those of one node's token).
server_count() {
    case $1 in
    vault)
        tail -c +"$(($2 + 1))" "$KMSFS_VAULT_AUDIT" | python3 -c '
import json, sys
who = sys.argv[1] if len(sys.argv) > 1 else None
n = 0
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("type") != "request" or not (e.get("request", {}).get("path") or "").startswith("transit/"):
        continue
    if who and (e.get("auth") or {}).get("display_name") != who:
        continue
    n += 1
print(n)' ${3:+"$3"}
        ;;
    aws) tail -c +"$(($2 + 1))" "$RUN/moto/moto.log" | grep -c '"POST / ' || true ;;
    local) echo "null" ;;
    esac
}

# ---------------------------------------------------------------- KMS servers
start_kms() {
    case $1 in
    local) return 0 ;;
    vault)
        ((STARTED_VAULT)) && return 0
        STARTED_VAULT=1
        # With its file audit device: the requests are counted there.
        KMSFS_VAULT_NO_AUDIT=0 bash "$KMSFS_ROOT/scripts/dev-vault.sh" start "$RUN/vault" >"$RUN/vault.env" 2>"$RUN/vault.err" ||
            { cat "$RUN/vault.err" >&2; return 1; }
        # shellcheck disable=SC1091
        source "$RUN/vault.env"
        [[ -n ${KMSFS_VAULT_AUDIT:-} ]] || { echo "dev-vault.sh printed no KMSFS_VAULT_AUDIT" >&2; return 1; }
        # One token per node, so the audit log tells the nodes apart.
        local who
        for who in writer a b; do
            HOME=$RUN/vault "$KMSFS_VAULT_BAO" token create -policy=root -display-name="scale-$who" \
                -field=token >"$RUN/vault/token-$who" 2>>"$RUN/vault.err" || { cat "$RUN/vault.err" >&2; return 1; }
        done
        ;;
    aws)
        ((STARTED_MOTO)) && return 0
        STARTED_MOTO=1
        bash "$KMSFS_ROOT/scripts/dev-moto.sh" start "$RUN/moto" >"$RUN/moto.env" 2>"$RUN/moto.err" ||
            { cat "$RUN/moto.err" >&2; return 1; }
        # shellcheck disable=SC1091
        source "$RUN/moto.env"
        ;;
    esac
}

init_volume() { # KMS MODE BACKING
    local -a args=(init "$3")
    case $1 in
    local) args+=(--kms local --key-file "$RUN/keyring" --key-name scale) ;;
    vault) args+=(--kms vault --vault-addr "$VAULT_ADDR" --vault-key "$KMSFS_VAULT_KEY") ;;
    aws) args+=(--kms aws --aws-key-id "$KMSFS_AWS_KEY_ARN" --aws-region us-east-1 --aws-endpoint "$KMSFS_AWS_ENDPOINT") ;;
    esac
    [[ $2 == directory ]] && args+=(--key-mode directory)
    "$KMSFS" "${args[@]}"
}

# mount_node KMS WHO BACKING MNT PORT OPTIONS LOG
mount_node() {
    local kms=$1 who=$2 backing=$3 mnt=$4 port=$5 opts=$6 logf=$7
    mkdir -p "$mnt"
    echo "$mnt" >>"$MOUNTS_FILE"
    local -a env=()
    [[ $kms == vault ]] && env=(VAULT_TOKEN="$(cat "$RUN/vault/token-$who")")
    local -a o=()
    [[ -z $opts ]] || o=(-o "$opts")
    env "${env[@]}" "$KMSFS" mount "$backing" "$mnt" "${o[@]}" --metrics-addr "127.0.0.1:$port" \
        --log-file "$logf"
}

umount_node() {
    force_unmount "$1" || return 1
    for _ in $(seq 1 100); do pgrep -f -- "mount .* $1 " >/dev/null || return 0; sleep 0.1; done
}

# ---------------------------------------------------------------- one case
run_case() {
    local kms=$1 mode=$2 base g backing_w backing_a backing_b opts t0 t1 mark port rc
    g=$RUN/$kms-$mode
    mkdir -p "$g"
    if ((GLUSTER)); then
        base=$kms-$mode
        backing_w=$NODE_A/$base backing_a=$NODE_A/$base backing_b=$NODE_B/$base
    else
        backing_w=$g/backing backing_a=$g/backing backing_b=$g/backing
    fi
    log "== $kms, $mode: init"
    if ! init_volume "$kms" "$mode" "$backing_w" >"$g/init.log" 2>&1; then
        rec_err "$kms" "$mode" creates "kmsfs init failed: $(first_error "$g/init.log")"
        return 0
    fi
    # The writer is the volume's only mount while it runs.
    opts=
    [[ $mode == per-file-nopool ]] && opts=dek_pool=0

    # (a) creates through one mount, on a settled disk.
    sync
    port=$(free_port)
    mark=$(server_mark "$kms")
    if ! mount_node "$kms" writer "$backing_w" "$g/mnt-w" "$port" "$opts" "$g/kmsfs-w.log" >"$g/mount-w.log" 2>&1; then
        rec_err "$kms" "$mode" creates "mount ${opts:+-o $opts }failed: $(first_error "$g/mount-w.log")"
        return 0
    fi
    log "$kms, $mode: creating $FILES files of $FILE_SIZE bytes"
    t0=$(now)
    rc=0
    timeout "$STEP_TIMEOUT" python3 "$BENCH_DIR/ml_files.py" create "$g/mnt-w/ml" "$FILES" "$FILE_SIZE" >"$g/create.log" 2>&1 || rc=$?
    t1=$(now)
    local sent
    sent=$(sent_requests "$port") || sent=null
    umount_node "$g/mnt-w" || rec_err "$kms" "$mode" umount "unmounting the writer failed"
    if ((rc)); then
        rec_err "$kms" "$mode" creates "creating failed (rc $rc): $(tail -n 1 "$g/create.log" | cut -c1-300)"
        return 0
    fi
    rec "$kms" "$mode" create_s "$(elapsed "$t0" "$t1")"
    rec "$kms" "$mode" create_sent "$sent"
    rec "$kms" "$mode" create_server "$(server_count "$kms" "$mark")"

    # (b) cold read by two fresh nodes at once
    drop_caches
    local pa pb
    pa=$(free_port) pb=$(free_port)
    if ! mount_node "$kms" a "$backing_a" "$g/mnt-a" "$pa" "$READERS_OPTS" "$g/kmsfs-a.log" >"$g/mount-a.log" 2>&1 ||
        ! mount_node "$kms" b "$backing_b" "$g/mnt-b" "$pb" "$READERS_OPTS" "$g/kmsfs-b.log" >"$g/mount-b.log" 2>&1; then
        rec_err "$kms" "$mode" read "mounting the two nodes with -o $READERS_OPTS failed: $(cat "$g/mount-a.log" "$g/mount-b.log" >"$g/mount-ab.log"; first_error "$g/mount-ab.log")"
        umount_node "$g/mnt-a" || true
        umount_node "$g/mnt-b" || true
        return 0
    fi
    python3 "$BENCH_DIR/ml_files.py" list "$g/mnt-a/ml" "$FILES" 1 "$g/list-a"
    python3 "$BENCH_DIR/ml_files.py" list "$g/mnt-b/ml" "$FILES" 2 "$g/list-b"
    local sa0 sb0
    sa0=$(sent_requests "$pa") || sa0=
    sb0=$(sent_requests "$pb") || sb0=
    mark=$(server_mark "$kms")
    log "$kms, $mode: cold read by two nodes ($PROCS processes each, -o $READERS_OPTS)"
    local ra=0 rb=0
    timeout "$STEP_TIMEOUT" python3 "$BENCH_DIR/ml_files.py" read "$g/list-a" "$PROCS" >"$g/read-a.json" 2>"$g/read-a.err" &
    local ja=$!
    timeout "$STEP_TIMEOUT" python3 "$BENCH_DIR/ml_files.py" read "$g/list-b" "$PROCS" >"$g/read-b.json" 2>"$g/read-b.err" &
    local jb=$!
    wait "$ja" || ra=$?
    wait "$jb" || rb=$?
    local node f secs files sent0 p who
    for node in a b; do
        f=$g/read-$node.json
        if [[ $node == a ]]; then rc=$ra sent0=$sa0 p=$pa; else rc=$rb sent0=$sb0 p=$pb; fi
        if ((rc)) || ! read -r files secs < <(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["files"], j["seconds"])' "$f" 2>/dev/null); then
            rec_err "$kms" "$mode" "read_$node" "node $node's read failed (rc $rc): $(head -c 300 "$g/read-$node.err")"
            continue
        fi
        if ((files != FILES)); then
            rec_err "$kms" "$mode" "read_$node" "node $node read $files of $FILES files: $(head -c 300 "$g/read-$node.err")"
            continue
        fi
        rec "$kms" "$mode" "read_${node}_s" "$secs"
        if [[ -n $sent0 ]] && sent=$(sent_requests "$p"); then
            rec "$kms" "$mode" "read_${node}_sent" "$((sent - sent0))"
        fi
        who=
        [[ $kms == vault ]] && who=token-scale-$node
        [[ $kms == vault ]] && rec "$kms" "$mode" "read_${node}_server" "$(server_count "$kms" "$mark" "$who")"
    done
    rec "$kms" "$mode" read_server "$(server_count "$kms" "$mark")"
    umount_node "$g/mnt-a" || rec_err "$kms" "$mode" umount "unmounting node A failed"
    umount_node "$g/mnt-b" || rec_err "$kms" "$mode" umount "unmounting node B failed"
    # Removed only when every case has run (DONE_BACKINGS): a removal of
    # 2 x N files still at work in the backing filesystem made the next
    # case's creates up to twice as slow.
    DONE_BACKINGS+=("$backing_w")
}
DONE_BACKINGS=()

# ---------------------------------------------------------------- main
if ((GLUSTER)); then
    log "bringing GlusterFS up (scripts/dev-gluster.sh)"
    STARTED_GLUSTER=1
    bash "$KMSFS_ROOT/scripts/dev-gluster.sh" up "$RUN/gluster" >"$RUN/gluster.env" || die "scripts/dev-gluster.sh up failed"
    # shellcheck disable=SC1091
    source "$RUN/gluster.env"
    GLUSTER_BASE=$NODE_A/scale
fi
START_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "run directory $RUN; $FILES files; kms=$KMSS modes=$MODES gluster=$GLUSTER readers -o $READERS_OPTS"
for kms in ${KMSS//,/ }; do
    if ! start_kms "$kms"; then
        for mode in ${MODES//,/ }; do rec_err "$kms" "$mode" creates "the $kms dev server did not start (see $RUN/$kms.err)"; done
        continue
    fi
    for mode in ${MODES//,/ }; do run_case "$kms" "$mode"; done
done
((${#DONE_BACKINGS[@]} == 0)) || rm -rf "${DONE_BACKINGS[@]}"

cat >"$RUN/meta.json" <<EOF
{"date": "$START_DATE", "files": $FILES, "file_bytes": $FILE_SIZE, "quick": $QUICK, "gluster": $GLUSTER,
 "readers_opts": $(json_str "$READERS_OPTS"), "procs_per_node": $PROCS, "nproc": $(nproc),
 "kmsfs": $(json_str "$("$KMSFS" --version 2>/dev/null | head -n1) ($(cd "$KMSFS_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'))")}
EOF
python3 "$BENCH_DIR/scale_report.py" "$RUN/meta.json" "$RAW" "$OUT"
