#!/usr/bin/env bash
# kmsfs benchmark harness: kmsfs against plain (the same disk, no FUSE),
# gocryptfs and securefs. See docs/BENCHMARKS.md.
#
# Usage: bash scripts/bench/run.sh [--quick] [--only W,...] [--fs F,...]
#                                  [--reps N] [--ml-files N] [--workdir DIR] [--out DIR]
#   --quick      small sizes for smoke tests (64 MiB, 2,000 ML files, a part
#                of the kernel tree, 1 repetition); marked QUICK everywhere
#   --only       workloads: seqwrite,seqread,randread,kernel,ml,vault
#                (default: all)
#   --fs         filesystems: plain,gocryptfs,securefs,kmsfs,kmsfs-shared
#                (default: all but kmsfs-shared, which is kmsfs mounted
#                -o shared; the vault workload needs kmsfs)
#   --reps N     repetitions of every figure (default 2, quick 1); the
#                report shows the median
#   --workdir    scratch space, on the same disk as the repo
#                (default /var/tmp/kmsfs-bench); cache/ in it keeps the
#                decompressed kernel tar and its checksums between runs
#   --ml-files N number of 100 KiB files of the ML workloads (default
#                20,000, quick 2,000)
#   --out DIR    results (default WORKDIR/results): latest.json,
#                a dated copy, the table (latest.txt, latest.md)
# Needs root (drop_caches, FUSE). Installs gocryptfs, securefs, fio,
# linux-source-6.1 and fuse3 with apt-get if missing.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=scripts/lib.sh
source "$BENCH_DIR/../lib.sh"

QUICK=0
ONLY=seqwrite,seqread,randread,kernel,ml,vault
FSLIST=plain,gocryptfs,securefs,kmsfs
REPS=
WORKDIR=/var/tmp/kmsfs-bench
OUT=
ML_FILES_OPT=

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "bench: error: $*" >&2; exit 1; }
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --fs) FSLIST=${2:?--fs needs a list}; shift ;;
    --fs=*) FSLIST=${1#*=} ;;
    --reps) REPS=${2:?--reps needs a number}; shift ;;
    --reps=*) REPS=${1#*=} ;;
    --workdir) WORKDIR=${2:?--workdir needs a directory}; shift ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --ml-files) ML_FILES_OPT=${2:?--ml-files needs a number}; shift ;;
    --ml-files=*) ML_FILES_OPT=${1#*=} ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --out=*) OUT=${1#*=} ;;
    -h | --help) usage 0 ;;
    *) echo "bench: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done

for w in ${ONLY//,/ }; do
    case $w in seqwrite | seqread | randread | kernel | ml | vault) ;; *) die "unknown workload $w (seqwrite,seqread,randread,kernel,ml,vault)" ;; esac
done
for f in ${FSLIST//,/ }; do
    case $f in plain | gocryptfs | securefs | kmsfs | kmsfs-shared) ;; *) die "unknown filesystem $f (plain,gocryptfs,securefs,kmsfs,kmsfs-shared)" ;; esac
done
want() { [[ ,$ONLY, == *,$1,* ]]; }
want_fs() { [[ ,$FSLIST, == *,$1,* ]]; }

if ((QUICK)); then
    REPS=${REPS:-1}
    SEQ_MIB=64
    RAND_SECONDS=5
    ML_FILES=2000
    KERNEL_SET=quick
else
    REPS=${REPS:-2}
    SEQ_MIB=1024
    RAND_SECONDS=20
    ML_FILES=20000
    KERNEL_SET=full
fi
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
if [[ -n $ML_FILES_OPT ]]; then
    [[ $ML_FILES_OPT =~ ^[1-9][0-9]*$ ]] || die "--ml-files must be a positive integer"
    ML_FILES=$ML_FILES_OPT
fi
ML_SIZE=102400
ML_PROCS=8
# Parts of the kernel tree used by --quick (about 10,000 entries).
QUICK_SUBDIRS=(fs kernel lib mm net/ipv4 include)
STEP_TIMEOUT=${KMSFS_BENCH_STEP_TIMEOUT:-2400}

[[ $(id -u) == 0 ]] || die "run as root (drop_caches and FUSE mounts need it)"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd -P)
OUT=${OUT:-$WORKDIR/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd -P)
CACHE=$WORKDIR/cache
RUN=$WORKDIR/run
# The kmsfs volumes of a run name their keys in a trusted configuration
# of the run's own, not in /etc/kmsfs's.
export KMSFS_CONFIG=$RUN/kmsfs.toml
RAW=$RUN/raw.jsonl
MOUNTS_FILE=$WORKDIR/.mounts
VAULT_STATE=$RUN/vault
VAULT_STARTED=0

# ---------------------------------------------------------------- cleanup
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_listed "$MOUNTS_FILE"
    if ((VAULT_STARTED)); then
        bash "$KMSFS_ROOT/scripts/dev-vault.sh" stop "$VAULT_STATE" >/dev/null 2>&1 || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Mounts left by a previous run that was killed hard.
unmount_listed "$MOUNTS_FILE"

# ---------------------------------------------------------------- install
install_deps() {
    local -a missing=()
    command -v gocryptfs >/dev/null || missing+=(gocryptfs)
    command -v securefs >/dev/null || missing+=(securefs)
    command -v fio >/dev/null || missing+=(fio)
    command -v fusermount3 >/dev/null || missing+=(fuse3)
    command -v curl >/dev/null || missing+=(curl)
    command -v xz >/dev/null || missing+=(xz-utils)
    [[ -f /usr/src/linux-source-6.1.tar.xz ]] || missing+=(linux-source-6.1)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null || die "apt-get update failed"
        apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi
}
install_deps

# The target directory is shared with other builds, which may replace the
# binary (even with other cargo features) while we run: benchmark a private
# copy. The vault workload needs the "vault" feature (on by default).
has_vault() {
    local out
    out=$("$1" init "$RUN/.feature-probe" --kms vault --vault-addr http://127.0.0.1:9 --vault-key probe 2>&1 || true)
    rm -rf "$RUN/.feature-probe"
    [[ $out != *"not available in this build"* ]]
}
snapshot_kmsfs() {
    for _ in 1 2 3; do
        if [[ -n ${KMSFS_BIN:-} ]]; then log "using KMSFS_BIN=$KMSFS_BIN"; else log "building kmsfs"; fi
        kmsfs_build >&2 || die "building kmsfs failed"
        mkdir -p "$RUN/bin"
        cp -f "$KMSFS" "$RUN/bin/kmsfs.tmp" && mv -f "$RUN/bin/kmsfs.tmp" "$RUN/bin/kmsfs"
        if has_vault "$RUN/bin/kmsfs"; then KMSFS_HAS_VAULT=1; break; fi
        KMSFS_HAS_VAULT=0
        [[ -z ${KMSFS_BIN:-} ]] || break
        log "the built kmsfs lacks the vault feature (another build replaced it?); rebuilding"
        sleep 5
    done
    KMSFS=$RUN/bin/kmsfs
    KMSFS_SHA=$(sha256sum "$KMSFS" | cut -c1-16)
}

# ---------------------------------------------------------------- records
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
# rec FS METRIC REP VALUE UNIT [EXTRA_JSON_FIELDS]
rec() {
    printf '{"fs":"%s","metric":"%s","rep":%s,"value":%s,"unit":"%s"%s}\n' \
        "$1" "$2" "$3" "$4" "$5" "${6:+,$6}" >>"$RAW"
}
# rec_err FS METRIC MESSAGE   (a failed figure: the report shows it as such)
rec_err() {
    log "ERROR $1 $2: $3"
    printf '{"fs":"%s","metric":"%s","error":%s}\n' "$1" "$2" "$(json_str "$3")" >>"$RAW"
}
# rec_na FS METRIC REASON     (a figure that could not be taken at all)
rec_na() {
    log "unavailable $1 $2: $3"
    printf '{"fs":"%s","metric":"%s","unavailable":%s}\n' "$1" "$2" "$(json_str "$3")" >>"$RAW"
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# ---------------------------------------------------------------- filesystems
# Each group gets G=$RUN/FS-GROUP with backing/ and mnt/. fs_init creates the
# filesystem, fs_mount mounts it (plain: nothing to do), fs_umount unmounts.
# DIR is where the workloads run: mnt/ for FUSE, backing/ for plain.
declare -A METRICS_PORT=()

fs_dir() { if [[ $1 == plain ]]; then echo "$2/backing"; else echo "$2/mnt"; fi; }

fs_init() {
    local fs=$1 g=$2
    rm -rf "$g"
    mkdir -p "$g/backing" "$g/mnt"
    case $fs in
    plain) ;;
    gocryptfs) gocryptfs -init -q -extpass 'echo benchpw' "$g/backing" >"$g/init.log" 2>&1 ;;
    securefs) securefs create --pass benchpw "$g/backing" >"$g/init.log" 2>&1 ;;
    kmsfs | kmsfs-shared) "$KMSFS" init "$g/backing" --kms local --key-file "$g/keyring" --key-name bench >"$g/init.log" 2>&1 ;;
    kmsfs-vault)
        # shellcheck disable=SC1091
        (source "$VAULT_STATE/env" && "$KMSFS" init "$g/backing" --kms vault \
            --vault-addr "$VAULT_ADDR" --vault-key "$KMSFS_VAULT_KEY") >"$g/init.log" 2>&1 ;;
    esac || { cat "$g/init.log" >&2; return 1; }
}

fs_mount() {
    local fs=$1 g=$2 port
    [[ $fs == plain ]] && return 0
    echo "$g/mnt" >>"$MOUNTS_FILE"
    case $fs in
    gocryptfs) gocryptfs -q -extpass 'echo benchpw' "$g/backing" "$g/mnt" >>"$g/mount.log" 2>&1 ;;
    securefs) securefs mount -b --pass benchpw --log "$g/securefs.log" "$g/backing" "$g/mnt" >>"$g/mount.log" 2>&1 ;;
    kmsfs | kmsfs-vault | kmsfs-shared)
        port=$(free_port)
        METRICS_PORT[$g]=$port
        if [[ $fs == kmsfs-vault ]]; then
            # shellcheck disable=SC1091
            (source "$VAULT_STATE/env" && "$KMSFS" mount "$g/backing" "$g/mnt" --log-file "$g/kmsfs.log" \
                --metrics-addr "127.0.0.1:$port") >>"$g/mount.log" 2>&1
        else
            local shared=()
            [[ $fs == kmsfs-shared ]] && shared=(-o shared)
            "$KMSFS" mount "$g/backing" "$g/mnt" --log-file "$g/kmsfs.log" \
                --metrics-addr "127.0.0.1:$port" "${shared[@]}" >>"$g/mount.log" 2>&1
        fi ;;
    esac || { tail -n 20 "$g/mount.log" >&2; return 1; }
    # securefs -b returns before the mount is visible
    for _ in $(seq 1 100); do is_mounted "$g/mnt" && return 0; sleep 0.1; done
    echo "mount of $fs at $g/mnt did not appear" >&2
    return 1
}

fs_umount() {
    local fs=$1 g=$2
    [[ $fs == plain ]] && return 0
    if [[ $fs == kmsfs* ]]; then
        force_unmount "$g/mnt" || return 1
    else
        KMSFS='' force_unmount "$g/mnt" || return 1
    fi
    # wait for the daemon to go, so the next mount does not compete with it
    for _ in $(seq 1 50); do pgrep -f -- " $g/backing $g/mnt" >/dev/null || break; sleep 0.1; done
    for _ in $(seq 1 50); do pgrep -f -- "$g/backing" >/dev/null || break; sleep 0.1; done
}

# Cold state: unmount, drop the page cache (and dentries/inodes), remount.
cold_remount() {
    local fs=$1 g=$2
    fs_umount "$fs" "$g" || return 1
    drop_caches
    fs_mount "$fs" "$g"
}

kmsfs_pid() { pgrep -n -f -- "kmsfs mount $2/backing $2/mnt" || true; }

# rec_rss FS G WHEN: VmRSS and VmHWM of the kmsfs daemon, in KiB
rec_rss() {
    local fs=$1 g=$2 when=$3 rep=$4 pid rss hwm
    [[ $fs == kmsfs* ]] || return 0
    pid=$(kmsfs_pid "$fs" "$g")
    [[ -n $pid ]] || { rec_err "$fs" "rss_$when" "daemon PID not found"; return 0; }
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
    rec "$fs" "rss_${when}_mib" "$rep" "$(awk -v k="$rss" 'BEGIN{printf "%.1f", k/1024}')" MiB
    rec "$fs" "hwm_${when}_mib" "$rep" "$(awk -v k="$hwm" 'BEGIN{printf "%.1f", k/1024}')" MiB
}

# Prints "UNWRAPS TOTAL" from the kmsfs metrics endpoint of group G.
kms_counts() {
    curl -fsS --max-time 10 "http://127.0.0.1:${METRICS_PORT[$1]}/metrics" | awk '
        /^kmsfs_kms_requests_total\{/ { t += $NF; if ($0 ~ /operation="unwrap(_batch)?"/) u += $NF }
        END { printf "%d %d\n", u, t }'
}

# CPU seconds (user + system) used so far by process PID.
cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$1/stat"
}

# Prints "REQUESTS CPU_SECONDS" of the dev OpenBao server: the transit
# requests it has handled (its own telemetry: what the server saw) and the
# CPU time it has used, which comes out of the same two cores as the
# workload's.
vault_server_counts() {
    (
        # shellcheck disable=SC1091
        source "$VAULT_STATE/env" || exit 1
        # The token goes in through a file descriptor, not argv (ps).
        n=$(curl -fsS --max-time 10 -H @<(printf 'X-Vault-Token: %s\n' "$VAULT_TOKEN") \
            "$VAULT_ADDR/v1/sys/metrics?format=prometheus" |
            awk '$1 == "vault_route_update_transit__count" { print $2 }') || exit 1
        [[ -n $n ]] || exit 1
        cpu=$(cpu_seconds "$KMSFS_VAULT_PID") || exit 1
        echo "$n $cpu"
    )
}

# rec_server FS METRIC_PREFIX REP BEFORE AFTER: the server's requests and CPU
# between two vault_server_counts.
rec_server() {
    local fs=$1 m=$2 rep=$3 before=$4 after=$5
    if [[ -z $before || -z $after ]]; then
        rec_err "$fs" "${m}_server" "could not read the OpenBao server's metrics or CPU time"
        return 0
    fi
    rec "$fs" "${m}_server_requests" "$rep" "$(awk -v a="${before% *}" -v b="${after% *}" 'BEGIN { printf "%d", b - a }')" requests
    rec "$fs" "${m}_server_cpu_s" "$rep" "$(elapsed "${before#* }" "${after#* }")" s
}

# run_timed LOG CMD...: runs CMD with a timeout, prints its wall seconds.
run_timed() {
    local logf=$1 t0 t1 rc
    shift
    t0=$(now)
    rc=0
    timeout "$STEP_TIMEOUT" "$@" >>"$logf" 2>&1 || rc=$?
    t1=$(now)
    if ((rc == 124)); then echo "timed out after ${STEP_TIMEOUT}s (hang?)" >>"$logf"; fi
    elapsed "$t0" "$t1"
    return "$rc"
}

fio_json_field() { # FILE read|write bw_bytes|iops
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["jobs"][0][sys.argv[2]][sys.argv[3]])' "$@"
}

# ---------------------------------------------------------------- workloads
# group_setup FS G TAG TITLE: logs the group's title, then init and mount
# for it; on failure records the error, cleans up and returns 1 (the group
# then returns 0).
group_setup() {
    local fs=$1 g=$2 tag=$3
    log "== $fs: $4"
    fs_init "$fs" "$g" && fs_mount "$fs" "$g" && return 0
    rec_err "$fs" "${tag}_setup" "init/mount failed (see $g)"
    fs_umount "$fs" "$g" || true
    return 1
}

# group_teardown FS G TAG: unmount (recording a failure) and drop the backing.
group_teardown() {
    local fs=$1 g=$2 tag=$3
    fs_umount "$fs" "$g" || rec_err "$fs" "${tag}_umount" "unmount failed"
    rm -rf "$g/backing"
}

group_seq() {
    local fs=$1 g=$RUN/$1-seq dir rep t out rc
    group_setup "$fs" "$g" seq "sequential write / cold read / 4K random read (${SEQ_MIB} MiB file)" || return 0
    dir=$(fs_dir "$fs" "$g")
    local fio_common=(--name=bench --filename="$dir/bench.dat" --ioengine=psync --numjobs=1
        --size="${SEQ_MIB}M" --fallocate=none --output-format=json)
    for rep in $(seq 1 "$REPS"); do
        if want seqwrite || [[ ! -f $dir/bench.dat ]]; then
            rm -f "$dir/bench.dat"
            drop_caches
            out=$g/fio-write-$rep.json
            rc=0
            t=$(run_timed "$g/fio.log" fio "${fio_common[@]}" --rw=write --bs=1M --end_fsync=1 --output="$out") || rc=$?
            if ((rc)); then
                rec_err "$fs" seqwrite "fio write failed (rc $rc, $g/fio.log)"
                break
            elif want seqwrite; then
                # wall time of the fio run, which includes the final fsync
                rec "$fs" seqwrite_mbs "$rep" "$(awk -v m="$SEQ_MIB" -v t="$t" 'BEGIN{printf "%.1f", m*1048576/t/1e6}')" MB/s \
                    "\"fio_mbs\":$(awk -v b="$(fio_json_field "$out" write bw_bytes)" 'BEGIN{printf "%.1f", b/1e6}')"
            fi
        fi
        if want seqread; then
            cold_remount "$fs" "$g" || { rec_err "$fs" seqread "remount failed"; break; }
            out=$g/fio-read-$rep.json
            rc=0
            run_timed "$g/fio.log" fio "${fio_common[@]}" --rw=read --bs=1M --invalidate=1 --output="$out" >/dev/null || rc=$?
            if ((rc)); then rec_err "$fs" seqread "fio read failed (rc $rc, $g/fio.log)"; else
                rec "$fs" seqread_cold_mbs "$rep" "$(awk -v b="$(fio_json_field "$out" read bw_bytes)" 'BEGIN{printf "%.1f", b/1e6}')" MB/s
            fi
        fi
        if want randread; then
            cold_remount "$fs" "$g" || { rec_err "$fs" randread "remount failed"; break; }
            out=$g/fio-rand-$rep.json
            rc=0
            run_timed "$g/fio.log" fio "${fio_common[@]}" --rw=randread --bs=4k --invalidate=1 \
                --time_based --runtime="$RAND_SECONDS" --output="$out" >/dev/null || rc=$?
            if ((rc)); then rec_err "$fs" randread "fio randread failed (rc $rc, $g/fio.log)"; else
                rec "$fs" randread_cold_iops "$rep" "$(awk -v b="$(fio_json_field "$out" read iops)" 'BEGIN{printf "%.0f", b}')" IOPS \
                    "\"mbs\":$(awk -v b="$(fio_json_field "$out" read bw_bytes)" 'BEGIN{printf "%.2f", b/1e6}')"
            fi
        fi
    done
    group_teardown "$fs" "$g" seq
}

# The kernel tree: decompressed once into the cache, with md5 sums taken on
# a plain extraction (outside any mount). --quick uses a few subtrees.
prepare_kernel() {
    local src=/usr/src/linux-source-6.1.tar.xz full=$CACHE/linux-source-6.1.tar ref
    mkdir -p "$CACHE"
    if [[ ! -s $full ]]; then
        log "decompressing $src once into $full"
        xz -dc "$src" >"$full.tmp" && mv "$full.tmp" "$full"
    fi
    KTAR=$CACHE/linux-$KERNEL_SET.tar
    KSUMS=$CACHE/linux-$KERNEL_SET.md5
    KTOP=linux-source-6.1
    if [[ -s $KTAR && -s $KSUMS ]]; then return 0; fi
    log "extracting a reference tree and computing md5 sums (once, $KERNEL_SET)"
    ref=$CACHE/ref
    rm -rf "$ref"
    mkdir -p "$ref"
    if [[ $KERNEL_SET == quick ]]; then
        tar -xf "$full" -C "$ref" "${QUICK_SUBDIRS[@]/#/$KTOP/}"
        tar -cf "$KTAR.tmp" -C "$ref" "$KTOP" && mv "$KTAR.tmp" "$KTAR"
    else
        tar -xf "$full" -C "$ref"
        ln -f "$full" "$KTAR" 2>/dev/null || cp "$full" "$KTAR"
    fi
    (cd "$ref/$KTOP" && find . -type f -print0 | sort -z | xargs -0 md5sum) >"$KSUMS.tmp" && mv "$KSUMS.tmp" "$KSUMS"
    rm -rf "$ref"
}

group_kernel() {
    local fs=$1 g=$RUN/$1-kernel dir rep t rc tree
    group_setup "$fs" "$g" kernel "untar / md5sum -c / ls -lR / rm -rf of the Linux 6.1 tree ($KERNEL_SET, $KENTRIES entries)" || return 0
    dir=$(fs_dir "$fs" "$g")
    tree=$dir/$KTOP
    for rep in $(seq 1 "$REPS"); do
        drop_caches
        rc=0
        t=$(run_timed "$g/untar.log" tar -xf "$KTAR" -C "$dir") || rc=$?
        if ((rc)); then rec_err "$fs" untar "tar xf failed (rc $rc, $(grep -c . "$g/untar.log") lines in $g/untar.log; first: $(head -n 1 "$g/untar.log" | cut -c1-200))"; break; fi
        rec "$fs" untar_s "$rep" "$t" s
        rec_rss "$fs" "$g" after_untar "$rep"

        drop_caches
        rc=0
        t=$(cd "$tree" && run_timed "$g/md5.log" md5sum -c --quiet "$KSUMS") || rc=$?
        if ((rc)); then
            rec_err "$fs" md5sum "md5sum -c FAILED (rc $rc): $(grep -c 'FAILED' "$g/md5.log" || true) files differ or are unreadable; first: $(grep -m3 -E 'FAILED|No such|error' "$g/md5.log" | tr '\n' ';')"
        else
            rec "$fs" md5sum_s "$rep" "$t" s
        fi

        drop_caches
        rc=0
        t=$(run_timed /dev/null ls -lR "$tree") || rc=$?
        if ((rc)); then rec_err "$fs" ls_lR "ls -lR failed (rc $rc)"; else rec "$fs" ls_lR_s "$rep" "$t" s; fi

        rc=0
        t=$(run_timed "$g/rm.log" rm -rf "$tree") || rc=$?
        if ((rc)) || [[ -e $tree ]]; then rec_err "$fs" rm_rf "rm -rf failed (rc $rc, $g/rm.log)"; break; fi
        rec "$fs" rm_rf_s "$rep" "$t" s
    done
    group_teardown "$fs" "$g" kernel
}

# ML-style read: create the files (unmeasured), then per repetition remount
# cold (drop caches; a fresh daemon, so an empty DEK cache for kmsfs), read
# them all in random order with 8 processes (cold), and again (warm).
group_ml() {
    local fs=$1 g=$RUN/$1-ml dir rep out rc before after c0 c1 s0 s1 list pid cpu0 cpu1
    group_setup "$fs" "$g" ml "ML-style read of $ML_FILES x 100 KiB files, $ML_PROCS readers" || return 0
    dir=$(fs_dir "$fs" "$g")
    if [[ $fs == kmsfs* ]]; then c0=$(kms_counts "$g") || c0=; fi
    if [[ $fs == kmsfs-vault ]]; then s0=$(vault_server_counts) || s0=; fi
    rc=0
    t=$(run_timed "$g/ml-create.log" python3 "$BENCH_DIR/ml_files.py" create "$dir/ml" "$ML_FILES" "$ML_SIZE") || rc=$?
    if ((rc)); then rec_err "$fs" ml_create "creating the files failed (rc $rc): $(tail -n 1 "$g/ml-create.log" | cut -c1-200)"; group_teardown "$fs" "$g" ml; return 0; fi
    rec "$fs" ml_create_s 1 "$t" s
    if [[ $fs == kmsfs* ]]; then
        c1=$(kms_counts "$g") || c1=
        if [[ -n $c0 && -n $c1 ]]; then
            rec "$fs" ml_create_kms_requests 1 "$(( ${c1#* } - ${c0#* } ))" requests
        else
            rec_err "$fs" ml_create_kms "could not read the daemon's /metrics"
        fi
    fi
    if [[ $fs == kmsfs-vault ]]; then
        s1=$(vault_server_counts) || s1=
        rec_server "$fs" ml_create 1 "$s0" "$s1"
    fi
    for rep in $(seq 1 "$REPS"); do
        list=$g/list-$rep.txt
        python3 "$BENCH_DIR/ml_files.py" list "$dir/ml" "$ML_FILES" "$rep" "$list"
        cold_remount "$fs" "$g" || { rec_err "$fs" ml_cold "remount failed"; break; }
        for phase in cold warm; do
            if [[ $fs == kmsfs* ]]; then
                before=$(kms_counts "$g") || before=
                pid=$(kmsfs_pid "$fs" "$g")
                cpu0=$(cpu_seconds "$pid" 2>/dev/null) || cpu0=
            fi
            [[ $fs == kmsfs-vault ]] && { s0=$(vault_server_counts) || s0=; }
            out=$g/ml-$phase-$rep.json
            rc=0
            timeout "$STEP_TIMEOUT" python3 "$BENCH_DIR/ml_files.py" read "$list" "$ML_PROCS" >"$out" 2>>"$g/ml-read.log" || rc=$?
            if ((rc)); then rec_err "$fs" "ml_$phase" "reading failed (rc $rc; $g/ml-read.log: $(head -c 300 "$g/ml-read.log"))"; continue; fi
            read -r files bytes secs < <(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["files"], j["bytes"], j["seconds"])' "$out")
            rec "$fs" "ml_${phase}_files_s" "$rep" "$(awk -v n="$files" -v t="$secs" 'BEGIN{printf "%.1f", n/t}')" files/s
            rec "$fs" "ml_${phase}_mbs" "$rep" "$(awk -v b="$bytes" -v t="$secs" 'BEGIN{printf "%.1f", b/t/1e6}')" MB/s
            if [[ $fs == kmsfs* ]]; then
                after=$(kms_counts "$g") || after=
                if [[ -n $before && -n $after ]]; then
                    rec "$fs" "ml_${phase}_kms_unwraps" "$rep" "$(( ${after% *} - ${before% *} ))" requests \
                        "\"all_kms_requests\":$(( ${after#* } - ${before#* } )),\"files\":$files"
                else
                    rec_err "$fs" "ml_${phase}_kms" "could not read the daemon's /metrics"
                fi
                if [[ -n $cpu0 ]] && cpu1=$(cpu_seconds "$pid" 2>/dev/null); then
                    rec "$fs" "ml_${phase}_daemon_cpu_s" "$rep" "$(elapsed "$cpu0" "$cpu1")" s
                else
                    rec_err "$fs" "ml_${phase}_daemon_cpu" "could not read the daemon's CPU time"
                fi
            fi
            if [[ $fs == kmsfs-vault ]]; then
                s1=$(vault_server_counts) || s1=
                rec_server "$fs" "ml_$phase" "$rep" "$s0" "$s1"
            fi
        done
        rec_rss "$fs" "$g" after_ml "$rep"
    done
    group_teardown "$fs" "$g" ml
}

group_vault() {
    local err
    log "== kmsfs with a Vault policy (dev OpenBao): starting the server"
    if [[ ! -f $KMSFS_ROOT/scripts/dev-vault.sh ]]; then
        rec_na kmsfs-vault ml "scripts/dev-vault.sh is missing"
        return 0
    fi
    if ((!KMSFS_HAS_VAULT)); then
        rec_na kmsfs-vault ml "the kmsfs binary was built without the vault cargo feature"
        return 0
    fi
    mkdir -p "$VAULT_STATE"
    VAULT_STARTED=1
    # Without the audit device: it is there for the tests, and hashing every
    # batch item for it took half the server's CPU (see docs/BENCHMARKS.md).
    # The requests are counted from the server's telemetry instead.
    if ! KMSFS_VAULT_NO_AUDIT=1 bash "$KMSFS_ROOT/scripts/dev-vault.sh" start "$VAULT_STATE" >/dev/null 2>"$RUN/vault.err"; then
        err=$(tail -n 3 "$RUN/vault.err" | tr '\n' ' ')
        rec_na kmsfs-vault ml "scripts/dev-vault.sh start failed: $err"
        return 0
    fi
    if ! grep -q '^export VAULT_ADDR=' "$VAULT_STATE/env" 2>/dev/null; then
        rec_na kmsfs-vault ml "scripts/dev-vault.sh printed no VAULT_ADDR"
        return 0
    fi
    group_ml kmsfs-vault
    bash "$KMSFS_ROOT/scripts/dev-vault.sh" stop "$VAULT_STATE" >/dev/null 2>&1 || true
    VAULT_STARTED=0
}

# ---------------------------------------------------------------- main
# Remove only a run directory this script made (marker file), and never
# while something below it is still mounted.
if [[ -e $RUN ]]; then
    [[ -f $RUN/.kmsfs-bench-run || -f $RUN/meta.json ]] || die "$RUN exists and was not made by this script; choose another --workdir"
    if grep -q " $(realpath "$RUN")/" /proc/self/mounts; then die "something is still mounted below $RUN"; fi
    rm -rf "$RUN"
fi
mkdir -p "$RUN"
: >"$RUN/.kmsfs-bench-run"
: >"$RAW"
if [[ -n ${KMSFS_BIN:-} ]]; then KMSFS_BIN=$(abs_path "$KMSFS_BIN"); fi
snapshot_kmsfs
START_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "run directory $RUN; results in $OUT; reps=$REPS quick=$QUICK only=$ONLY fs=$FSLIST"

if want seqwrite || want seqread || want randread; then
    for fs in ${FSLIST//,/ }; do group_seq "$fs"; done
fi
if want kernel; then
    prepare_kernel
    KENTRIES=$(tar -tf "$KTAR" | wc -l)
    for fs in ${FSLIST//,/ }; do group_kernel "$fs"; done
fi
if want ml; then
    for fs in ${FSLIST//,/ }; do group_ml "$fs"; done
fi
if want vault; then
    if want_fs kmsfs; then group_vault; else log "vault workload skipped: kmsfs is not in --fs"; fi
fi

# ---------------------------------------------------------------- report
ver() { "$@" 2>/dev/null | head -n1 || true; }
cat >"$RUN/meta.json" <<EOF
{
  "date": "$START_DATE",
  "end_date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "quick": $([[ $QUICK == 1 ]] && echo true || echo false),
  "reps": $REPS,
  "only": "$ONLY",
  "fs": "$FSLIST",
  "sizes": {"seq_mib": $SEQ_MIB, "randread_seconds": $RAND_SECONDS, "ml_files": $ML_FILES, "ml_file_bytes": $ML_SIZE,
            "ml_readers": $ML_PROCS, "kernel_set": "$KERNEL_SET", "kernel_entries": ${KENTRIES:-null}},
  "machine": {
    "nproc": $(nproc),
    "mem_total_kib": $(awk '/^MemTotal:/ {print $2}' /proc/meminfo),
    "kernel": $(json_str "$(uname -r)"),
    "cpu": $(json_str "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"),
    "os": $(json_str "$(. /etc/os-release && echo "$PRETTY_NAME")"),
    "disk": $(json_str "$(df -h --output=source,fstype,size "$WORKDIR" | tail -n1 | tr -s ' ')"),
    "loadavg_start": $(json_str "$LOAD_START"),
    "loadavg_end": $(json_str "$(cut -d' ' -f1-3 /proc/loadavg)")
  },
  "versions": {
    "kmsfs": $(json_str "$(ver "$KMSFS" --version) (sha256 $KMSFS_SHA, $(cd "$KMSFS_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo 'no commit')$(cd "$KMSFS_ROOT" && [[ -n $(git status --porcelain 2>/dev/null) ]] && echo ', dirty'))"),
    "gocryptfs": $(json_str "$(ver gocryptfs -version)"),
    "securefs": $(json_str "$(dpkg-query -W -f '${Version}' securefs 2>/dev/null)"),
    "fio": $(json_str "$(ver fio --version)"),
    "linux_source": $(json_str "$(dpkg-query -W -f '${Version}' linux-source-6.1 2>/dev/null)")
  },
  "config": {
    "kmsfs": "defaults: aes-256-gcm, 4096-byte blocks, 8 FUSE threads, local keyring (vault: dev OpenBao transit)",
    "gocryptfs": "gocryptfs -init defaults (AES-256-GCM)",
    "securefs": "securefs create defaults"
  }
}
EOF
python3 "$BENCH_DIR/report.py" "$RUN/meta.json" "$RAW" "$OUT"
