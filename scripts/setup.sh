#!/usr/bin/env bash
# Installs what kmsfs needs to build, mount and be tested on a fresh
# Debian 12 machine: FUSE 3 (fusermount3), /dev/fuse, a few tools the demo and
# tests use, and the pjdfstest POSIX suite; then installs the kmsfs mount
# helper (/sbin/mount.fuse.kmsfs, for mount -t fuse.kmsfs and fstab), building
# kmsfs first if there is no binary yet. Idempotent: a second run only checks,
# and links the helper again.
#
# Environment:
#   KMSFS_SETUP_EXTRA_APT  extra Debian packages to install (space separated)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        die "must run as root (FUSE mounts, apt-get, useradd); sudo is not available"
    fi
else
    SUDO=()
fi

# fuse3: fusermount3, which the fuser crate uses to mount and unmount.
# attr:  getfattr/setfattr, handy to inspect extended attributes.
# xxd:   the demo shows the ciphertext with it.
# kmod:  modprobe, to load the fuse module when /dev/fuse is missing.
# python3-venv, curl, util-linux (flock): scripts/dev-moto.sh and
#        scripts/dev-vault.sh install moto / OpenBao from PyPI into venvs for
#        the KMS integration tests; util-linux also has mount(8), which the
#        mount helper's tests drive.
# systemd: systemd-analyze, which checks contrib/systemd/kmsfs@.service.
APT_PACKAGES=(fuse3 attr xxd kmod ca-certificates pkg-config gcc libc6-dev
    python3 python3-venv curl util-linux systemd)
# shellcheck disable=SC2206
APT_PACKAGES+=(${KMSFS_SETUP_EXTRA_APT:-})

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

apt_log=$(mktemp /tmp/kmsfs-setup-apt.XXXXXX.log)
trap 'rm -f "$apt_log"' EXIT

# apt keeps the server's timestamps on the list files, so remember ourselves
# when we last ran apt-get update.
UPDATE_STAMP=/var/lib/apt/lists/.kmsfs-apt-update-stamp
apt_update() {
    log "apt-get update"
    if ! "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get update failed"
    fi
    "${SUDO[@]}" touch "$UPDATE_STAMP"
}
apt_install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -qq --no-install-recommends "$@" >"$apt_log" 2>&1
}

if ((${#missing[@]})); then
    updated=0
    if [[ -z $(find "$UPDATE_STAMP" -mmin -60 2>/dev/null) ]]; then
        apt_update
        updated=1
    fi
    log "apt-get install ${missing[*]}"
    if ! apt_install "${missing[@]}"; then
        if ((updated)); then
            cat "$apt_log" >&2
            die "apt-get install ${missing[*]} failed"
        fi
        # The package lists may be stale: refresh them and try once more.
        apt_update
        if ! apt_install "${missing[@]}"; then
            cat "$apt_log" >&2
            die "apt-get install ${missing[*]} failed"
        fi
    fi
else
    log "Debian packages present: ${APT_PACKAGES[*]}"
fi

command -v fusermount3 >/dev/null 2>&1 || die "fusermount3 not found after installing fuse3"

# /dev/fuse: load the module and create the node if a container lacks it.
if [[ ! -c /dev/fuse ]]; then
    log "/dev/fuse is missing: loading the fuse module and creating the device node"
    "${SUDO[@]}" modprobe fuse 2>/dev/null || true
    if [[ ! -c /dev/fuse ]]; then
        "${SUDO[@]}" mknod -m 0666 /dev/fuse c 10 229 || die "cannot create /dev/fuse (mknod c 10 229)"
    fi
fi
if [[ ! -r /dev/fuse || ! -w /dev/fuse ]]; then
    die "/dev/fuse exists but is not readable and writable by $(id -un)"
fi
log "/dev/fuse ok"

# allow_other is needed by the pjdfstest run (it switches to other users);
# root may always use it, this line lets non-root users do the same.
if [[ -f /etc/fuse.conf ]] && ! grep -qE '^[[:space:]]*user_allow_other' /etc/fuse.conf; then
    log "enabling user_allow_other in /etc/fuse.conf"
    echo 'user_allow_other' | "${SUDO[@]}" tee -a /etc/fuse.conf >/dev/null
fi

# Rust toolchain: provided by the machine image; we cannot download one here.
command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (install a Rust toolchain >= 1.85)"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing (rustup component add rustfmt)"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing (rustup component add clippy)"

# pjdfstest, the POSIX file-system suite (Rust rewrite, from crates.io).
CARGO_BIN_DIR=${CARGO_HOME:-$HOME/.cargo}/bin
if command -v pjdfstest >/dev/null 2>&1; then
    log "pjdfstest present: $(command -v pjdfstest)"
else
    log "cargo install pjdfstest --locked (takes a few minutes)"
    cargo_log=$(mktemp /tmp/kmsfs-setup-cargo.XXXXXX.log)
    if ! cargo install pjdfstest --locked >"$cargo_log" 2>&1; then
        tail -n 40 "$cargo_log" >&2
        die "cargo install pjdfstest failed (full log: $cargo_log)"
    fi
    rm -f "$cargo_log"
    command -v pjdfstest >/dev/null 2>&1 || die "pjdfstest installed but not on PATH ($CARGO_BIN_DIR)"
    log "pjdfstest installed: $(command -v pjdfstest)"
fi

# The mount helper: mount(8) runs /sbin/mount.fuse.kmsfs for type fuse.kmsfs;
# `kmsfs install-helper` makes it a link to the release binary, which the demo
# and the tests rebuild in place. So a binary already there installs it, and
# kmsfs is built only when there is none (or it is too old to install): a
# build here would cost the tests a second one, as they build it with their
# test features. A failed build is left for the demo and the tests to report.
install_helper() { [[ -x ${KMSFS:-} ]] && "${SUDO[@]}" "$KMSFS" install-helper --dir /sbin; }
KMSFS=${KMSFS_BIN:-$CARGO_TARGET_DIR/release/kmsfs}
if install_helper 2>/dev/null || { kmsfs_build && install_helper; }; then
    log "mount helper: /sbin/mount.fuse.kmsfs -> $KMSFS"
else
    log "warning: the mount helper is not installed (see above), so mount -t fuse.kmsfs will not work"
fi

log "done"
