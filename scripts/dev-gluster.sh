#!/usr/bin/env bash
# dev-gluster.sh — a throwaway, REAL GlusterFS volume mounted twice on this
# machine: two client mounts of one replica-2 volume, which stand in for two
# nodes sharing a backing directory (tests/shared.rs, scripts/bench/scale.sh).
#
# Usage:
#   scripts/dev-gluster.sh up     DIR   install (once), start, mount; print the env
#   scripts/dev-gluster.sh env    DIR   print the export lines of a running setup
#   scripts/dev-gluster.sh status DIR   exit 0 if DIR's setup is up, 3 if not
#   scripts/dev-gluster.sh down   DIR   unmount, stop and delete (idempotent)
#
#   eval "$(scripts/dev-gluster.sh up /tmp/g)"   # then use $NODE_A and $NODE_B
#
# `up` and `env` print ONLY `export NAME=VALUE` lines on stdout (also kept in
# DIR/env); progress and errors go to stderr. The lines are:
#   NODE_A           DIR/node-a: client mount 1 of the volume ("node A")
#   NODE_B           DIR/node-b: client mount 2 of the same volume ("node B")
#   GLUSTER_VOLUME   the volume's name (kmsfs-<hash of DIR>)
#   GLUSTER_DIR      DIR
#
# What `up` does:
#   1. installs glusterfs-server and glusterfs-client with apt-get if
#      `glusterd` or `mount.glusterfs` is missing (retrying after an
#      apt-get update, as scripts/setup.sh does);
#   2. starts glusterd (`glusterd -p DIR/glusterd.pid`: there is no systemd
#      here) unless one already answers `gluster peer status`, and waits
#      until it answers;
#   3. creates the volume (replica 2, bricks DIR/brick1/VOL and
#      DIR/brick2/VOL on this host, `force`: they sit on the root disk),
#      sets it up for several clients (below) and starts it;
#   4. mounts it twice with `mount -t glusterfs HOST:/VOL` and checks that a
#      file written through NODE_A reads back through NODE_B.
# A second `up` on a DIR that is up only prints the env. A half-made setup
# (a killed run) is taken down first.
#
# Coherence between the two clients. With GlusterFS 10's defaults a file
# written and closed through one client mount read back stale through the
# other 99% of the time here (the client-side md-cache, quick-read and
# open-behind, and the kernel's 1 s attribute and entry caches of each
# client mount). So the volume is made with performance.stat-prefetch,
# quick-read, open-behind, io-cache, read-ahead and write-behind off (with
# write-behind, an append made through kmsfs on one client was not seen
# through the other), and both clients mount with
# entry-timeout=0,attribute-timeout=0,negative-timeout=0,direct-io-mode=enable
# (plus $KMSFS_GLUSTER_MOUNT_OPTIONS, if set; without direct-io-mode, bytes
# rewritten in place through kmsfs on one client were read stale from the
# other client's page cache): then close-to-open, rename and unlink are
# seen at once. Set KMSFS_GLUSTER_CACHING=1 to keep GlusterFS's defaults
# instead.
#
# Locks: flock(2) and fcntl (POSIX and OFD) locks taken through one client
# mount are seen by the other (a conflicting non-blocking lock gets EAGAIN),
# and O_CREAT|O_EXCL is exclusive across the two (one winner per name).
#
# `down` unmounts both clients (lazily if busy), stops and deletes the
# volume, removes the bricks, and stops glusterd if `up` started it and no
# other volume is left. It succeeds when nothing is there.
#
# Exit status: 0 success; 1 failure (the reason on stderr); 2 usage error;
# 3 `status`: not up. Needs root (mount, glusterd).
set -euo pipefail

PROG=$(basename -- "$0")
HOST=$(hostname)
LOCK=/run/lock/kmsfs-dev-gluster.lock
GLUSTER_TIMEOUT=${KMSFS_GLUSTER_TIMEOUT:-60}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd=${1:-}
[[ -n $cmd ]] || usage
case $cmd in up | down | env | status) ;; -h | --help | help) usage ;; *) echo "$PROG: unknown command $cmd" >&2; usage ;; esac
[[ -n ${2:-} ]] || { echo "$PROG: $cmd needs a work directory" >&2; usage; }
[[ $(id -u) -eq 0 ]] || die "must run as root (glusterd and mount need it)"

if [[ $cmd != up && ! -d $2 ]]; then
    case $cmd in
    down) say "$2 does not exist; nothing to take down"; exit 0 ;;
    status) say "not up: $2 does not exist"; exit 3 ;;
    env) die "nothing is up in $2 (it does not exist)" ;;
    esac
fi
mkdir -p -- "$2" || die "cannot create $2"
DIR=$(cd -- "$2" && pwd -P)
VOL=kmsfs-$(printf '%s' "$DIR" | sha256sum | cut -c1-10)
NODE_A=$DIR/node-a
NODE_B=$DIR/node-b

gl() { timeout "$GLUSTER_TIMEOUT" gluster --mode=script "$@"; }
glusterd_answers() { timeout 10 gluster --mode=script peer status >/dev/null 2>&1; }
is_mounted() { findmnt -rn -M "$1" >/dev/null 2>&1 || grep -q " $1 " /proc/self/mounts; }
volume_exists() { gl volume info "$VOL" >/dev/null 2>&1; }
volume_started() { gl volume info "$VOL" 2>/dev/null | grep -q '^Status: Started'; }

# One up/down at a time on this machine (glusterd's volume operations take
# a cluster lock and fail rather than wait).
exec 9>"$LOCK"
flock -w 300 9 || die "timed out waiting for another $PROG run (lock $LOCK)"

install_gluster() {
    command -v glusterd >/dev/null && command -v gluster >/dev/null && [[ -x /sbin/mount.glusterfs ]] && return 0
    command -v apt-get >/dev/null || die "GlusterFS is not installed and there is no apt-get (install glusterfs-server and glusterfs-client)"
    local log
    log=$(mktemp /tmp/kmsfs-gluster-apt.XXXXXX.log)
    say "installing glusterfs-server glusterfs-client with apt-get (first run only)"
    local inst=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q
        --no-install-recommends glusterfs-server glusterfs-client)
    if ! "${inst[@]}" >"$log" 2>&1; then
        say "apt-get install failed; running apt-get update and trying again"
        local try ok=0
        for try in 1 2 3; do
            if apt-get -o DPkg::Lock::Timeout=600 update -q >>"$log" 2>&1 && "${inst[@]}" >>"$log" 2>&1; then
                ok=1
                break
            fi
            say "attempt $try failed; retrying in $((try * 5)) s"
            sleep $((try * 5))
        done
        ((ok)) || { tail -n 30 "$log" >&2; die "apt-get install glusterfs-server glusterfs-client failed (log: $log)"; }
    fi
    rm -f -- "$log"
    command -v glusterd >/dev/null || die "glusterfs-server installed but glusterd is missing"
    [[ -x /sbin/mount.glusterfs ]] || die "glusterfs-client installed but /sbin/mount.glusterfs is missing"
}

start_glusterd() {
    if glusterd_answers; then
        [[ -f $DIR/glusterd.started ]] || say "using the glusterd already running"
        return 0
    fi
    say "starting glusterd (log /var/log/glusterfs/glusterd.log)"
    mkdir -p /var/log/glusterfs /var/run/gluster
    glusterd -p "$DIR/glusterd.pid" </dev/null >/dev/null 2>&1 9>&- || die "glusterd failed to start (see /var/log/glusterfs/glusterd.log)"
    : >"$DIR/glusterd.started"
    local deadline=$((SECONDS + GLUSTER_TIMEOUT))
    until glusterd_answers; do
        ((SECONDS < deadline)) || { tail -n 20 /var/log/glusterfs/glusterd.log >&2 2>/dev/null || true; die "glusterd did not answer within ${GLUSTER_TIMEOUT}s"; }
        sleep 0.2
    done
}

# Whether PID $1 is a live (not zombie) glusterd.
glusterd_alive() {
    [[ $1 =~ ^[0-9]+$ && $(cat "/proc/$1/comm" 2>/dev/null) == glusterd ]] || return 1
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

unmount_one() {
    local m=$1 _i
    is_mounted "$m" || return 0
    umount "$m" 2>/dev/null || true
    for _i in $(seq 1 50); do is_mounted "$m" || return 0; sleep 0.1; done
    say "$m is busy; detaching it lazily"
    umount -l "$m" 2>/dev/null || true
    ! is_mounted "$m" || die "cannot unmount $m"
}

# Takes down whatever of this DIR's setup exists.
teardown() {
    unmount_one "$NODE_A"
    unmount_one "$NODE_B"
    if command -v gluster >/dev/null && glusterd_answers && volume_exists; then
        if volume_started; then
            gl volume stop "$VOL" force >/dev/null 2>"$DIR/gluster.err" ||
                { cat "$DIR/gluster.err" >&2; die "gluster volume stop $VOL failed"; }
        fi
        gl volume delete "$VOL" >/dev/null 2>"$DIR/gluster.err" ||
            { cat "$DIR/gluster.err" >&2; die "gluster volume delete $VOL failed"; }
        say "deleted volume $VOL"
    fi
    rm -rf -- "$DIR/brick1" "$DIR/brick2" "$DIR/env" "$DIR/gluster.err"
    if [[ -f $DIR/glusterd.started ]]; then
        local pid others
        pid=$(cat "$DIR/glusterd.pid" 2>/dev/null || true)
        others=$(gl volume list 2>/dev/null | grep -v '^No volumes present' || true)
        if [[ -n $others ]]; then
            say "leaving glusterd running: other volumes use it ($(echo "$others" | tr '\n' ' '))"
        elif glusterd_alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do glusterd_alive "$pid" || break; sleep 0.1; done
            ! glusterd_alive "$pid" || kill -KILL "$pid" 2>/dev/null || true
            say "stopped glusterd (PID $pid)"
        fi
        rm -f -- "$DIR/glusterd.started" "$DIR/glusterd.pid"
    fi
}

print_env() {
    {
        printf 'export NODE_A=%q\n' "$NODE_A"
        printf 'export NODE_B=%q\n' "$NODE_B"
        printf 'export GLUSTER_VOLUME=%q\n' "$VOL"
        printf 'export GLUSTER_DIR=%q\n' "$DIR"
    } >"$DIR/env.tmp"
    mv -f -- "$DIR/env.tmp" "$DIR/env"
    cat -- "$DIR/env"
}

# Whether a file written through A reads back through B (and the reverse).
works() {
    local probe=.dev-gluster-probe.$$ v
    v=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    echo "$v" >"$NODE_A/$probe" 2>/dev/null || return 1
    [[ $(cat "$NODE_B/$probe" 2>/dev/null) == "$v" ]] || { rm -f -- "$NODE_A/$probe"; return 1; }
    rm -f -- "$NODE_B/$probe"
    [[ ! -e $NODE_A/$probe ]]
}

is_up() {
    is_mounted "$NODE_A" && is_mounted "$NODE_B" && [[ -f $DIR/env ]] && works
}

cmd_up() {
    install_gluster
    command -v mount >/dev/null || die "mount(8) is missing (util-linux)"
    if [[ -f $DIR/env ]] && is_mounted "$NODE_A" && is_mounted "$NODE_B"; then
        if works; then
            say "reusing volume $VOL mounted at $NODE_A and $NODE_B"
            print_env
            return 0
        fi
        say "the setup in $DIR does not work; making it again"
    fi
    start_glusterd
    teardown_quietly
    mkdir -p -- "$DIR/brick1" "$DIR/brick2" "$NODE_A" "$NODE_B"
    say "creating volume $VOL (replica 2, bricks in $DIR)"
    gl volume create "$VOL" replica 2 "$HOST:$DIR/brick1/$VOL" "$HOST:$DIR/brick2/$VOL" force \
        >/dev/null 2>"$DIR/gluster.err" || { cat "$DIR/gluster.err" >&2; die "gluster volume create $VOL failed"; }
    local -a mopts=()
    if [[ ${KMSFS_GLUSTER_CACHING:-0} != 1 ]]; then
        local o
        for o in performance.stat-prefetch performance.quick-read performance.open-behind \
            performance.io-cache performance.read-ahead performance.write-behind; do
            gl volume set "$VOL" "$o" off >/dev/null 2>"$DIR/gluster.err" ||
                { cat "$DIR/gluster.err" >&2; die "gluster volume set $VOL $o off failed"; }
        done
        mopts=(-o "entry-timeout=0,attribute-timeout=0,negative-timeout=0,direct-io-mode=enable${KMSFS_GLUSTER_MOUNT_OPTIONS:+,$KMSFS_GLUSTER_MOUNT_OPTIONS}")
    fi
    gl volume start "$VOL" >/dev/null 2>"$DIR/gluster.err" 9>&- ||
        { cat "$DIR/gluster.err" >&2; die "gluster volume start $VOL failed (brick logs: /var/log/glusterfs/bricks/)"; }
    local m
    for m in "$NODE_A" "$NODE_B"; do
        mount -t glusterfs "${mopts[@]}" "$HOST:/$VOL" "$m" </dev/null >/dev/null 2>"$DIR/gluster.err" 9>&- ||
            { cat "$DIR/gluster.err" >&2; die "mount -t glusterfs $HOST:/$VOL $m failed (log: /var/log/glusterfs/$(echo "${m#/}" | tr / -).log)"; }
    done
    local deadline=$((SECONDS + GLUSTER_TIMEOUT))
    until works; do
        ((SECONDS < deadline)) || die "the two client mounts do not see each other's files after ${GLUSTER_TIMEOUT}s"
        sleep 0.2
    done
    rm -f -- "$DIR/gluster.err"
    say "volume $VOL up: node A at $NODE_A, node B at $NODE_B"
    print_env
}

# teardown, keeping glusterd (which cmd_up is about to use).
teardown_quietly() {
    local started=0
    [[ -f $DIR/glusterd.started ]] && { started=1; mv -f -- "$DIR/glusterd.started" "$DIR/glusterd.started.keep"; }
    teardown
    ((started)) && mv -f -- "$DIR/glusterd.started.keep" "$DIR/glusterd.started"
    return 0
}

case $cmd in
up) cmd_up ;;
env)
    is_mounted "$NODE_A" && is_mounted "$NODE_B" && [[ -f $DIR/env ]] || die "nothing is up in $DIR (run: $PROG up $DIR)"
    cat -- "$DIR/env"
    ;;
status)
    if is_up; then say "up: volume $VOL at $NODE_A and $NODE_B"; else say "not up in $DIR"; exit 3; fi
    ;;
down)
    teardown
    rmdir -- "$NODE_A" "$NODE_B" 2>/dev/null || true
    say "down: nothing of $DIR's setup is left"
    ;;
esac
