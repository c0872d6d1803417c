# shellcheck shell=bash
# Helpers shared by scripts/*.sh. Source it; it does nothing by itself.

# Repository root (this file lives in scripts/).
KMSFS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# Keep the build outside the clone, so fresh CI clones reuse it.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/kmsfs-target}
# cargo-installed tools (pjdfstest) live here.
case ":$PATH:" in *":${CARGO_HOME:-$HOME/.cargo}/bin:"*) ;; *) export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH" ;; esac

# Builds the release binary (unless KMSFS_BIN points at one) and sets KMSFS.
kmsfs_build() {
    if [[ -n ${KMSFS_BIN:-} ]]; then
        [[ -x $KMSFS_BIN ]] || { echo "KMSFS_BIN=$KMSFS_BIN is not an executable" >&2; return 1; }
        KMSFS=$KMSFS_BIN
        return 0
    fi
    echo "build: cargo build --release (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$KMSFS_ROOT" && cargo build --release --quiet) || { echo "build: cargo build --release failed" >&2; return 1; }
    KMSFS=$CARGO_TARGET_DIR/release/kmsfs
    [[ -x $KMSFS ]] || { echo "build: $KMSFS was not produced" >&2; return 1; }
}

# Absolute path without touching the last component (a dead FUSE mount
# answers stat with ENOTCONN, so realpath on it would fail).
abs_path() {
    local dir base
    dir=$(dirname -- "$1")
    base=$(basename -- "$1")
    dir=$(cd -- "$dir" 2>/dev/null && pwd -P) || dir=$(realpath -m -- "$(dirname -- "$1")")
    if [[ $dir == / ]]; then printf '/%s\n' "$base"; else printf '%s/%s\n' "$dir" "$base"; fi
}

# Prints "major:minor fstype" of the mount at $1 (absolute) if there is one.
mount_entry() {
    local want=$1
    # mountinfo: id parent major:minor root mountpoint opts ... - fstype source superopts
    awk -v want="$want" '
        function unesc(s) { gsub(/\\040/, " ", s); gsub(/\\011/, "\t", s); gsub(/\\012/, "\n", s); gsub(/\\134/, "\\", s); return s }
        {
            if (unesc($5) != want) next
            for (i = 7; i <= NF; i++) if ($i == "-") break
            line = $3 " " $(i + 1)
        }
        END { if (line != "") print line }' /proc/self/mountinfo
}

is_mounted() { [[ -n $(mount_entry "$(abs_path "$1")") ]]; }

# Unmounts $1 whatever state it is in: a clean unmount first (kmsfs umount if
# $KMSFS is set, else fusermount3 -u), then, if the daemon is stuck or dead,
# aborts the FUSE connection and detaches lazily. Returns 0 once unmounted.
force_unmount() {
    local mnt entry devno fstype
    mnt=$(abs_path "$1")
    is_mounted "$mnt" || return 0
    if [[ -n ${KMSFS:-} && -x ${KMSFS:-} ]]; then
        timeout 20 "$KMSFS" umount "$mnt" >/dev/null 2>&1 || true
    fi
    is_mounted "$mnt" && { timeout 20 fusermount3 -u "$mnt" >/dev/null 2>&1 || timeout 20 umount "$mnt" >/dev/null 2>&1 || true; }
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        is_mounted "$mnt" || return 0
        sleep 0.5
    done
    entry=$(mount_entry "$mnt")
    devno=${entry%% *}
    fstype=${entry#* }
    echo "unmount: $mnt did not unmount cleanly; aborting the FUSE connection and detaching it" >&2
    if [[ $fstype == fuse* && ! -e /sys/fs/fuse/connections/${devno#*:} ]]; then
        mount -t fusectl fusectl /sys/fs/fuse/connections >/dev/null 2>&1 || true
    fi
    if [[ $fstype == fuse* && -w /sys/fs/fuse/connections/${devno#*:}/abort ]]; then
        echo 1 >"/sys/fs/fuse/connections/${devno#*:}/abort" || true
    fi
    fusermount3 -uz "$mnt" >/dev/null 2>&1 || umount -l "$mnt" >/dev/null 2>&1 || true
    ! is_mounted "$mnt"
}

# Inits a fresh volume at $1 (the backing directory) on a local keyring
# under key name $2, with a trusted configuration of its own, and mounts it
# at $3 logging to $4; any further arguments go to `kmsfs mount`. The
# keyring, configuration and command output live beside the backing
# directory. Needs $KMSFS (kmsfs_build). Prints what failed and returns 1.
kmsfs_init_and_mount() {
    local backing=$1 key_name=$2 mnt=$3 daemon_log=$4 work
    shift 4
    work=$(dirname -- "$backing")
    export KMSFS_CONFIG=$work/kmsfs.toml
    if ! "$KMSFS" init "$backing" --kms local --key-file "$work/keyring" \
        --key-name "$key_name" >"$work/init.out" 2>&1; then
        cat "$work/init.out" >&2
        echo "kmsfs init failed" >&2
        return 1
    fi
    if ! "$KMSFS" mount "$backing" "$mnt" "$@" --log-file "$daemon_log" >"$work/mount.out" 2>&1; then
        cat "$work/mount.out" >&2
        [[ -f $daemon_log ]] && tail -n 30 "$daemon_log" >&2
        echo "kmsfs mount failed" >&2
        return 1
    fi
}

# Unmounts every mount point listed in FILE (one a line) that is still
# mounted, then removes FILE: the mounts a script recorded as it made them.
unmount_listed() {
    local file=$1 m
    [[ -f $file ]] || return 0
    while IFS= read -r m; do
        [[ -n $m ]] && is_mounted "$m" && { force_unmount "$m" || true; }
    done <"$file"
    rm -f "$file"
}
