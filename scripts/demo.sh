#!/usr/bin/env bash
# kmsfs demo: builds kmsfs, creates a local keyring and an encrypted backing
# directory, mounts it, writes a file, and shows plaintext through the mount
# next to ciphertext in the backing directory. Leaves the mount up.
#
# Usage: bash scripts/demo.sh [WORK_DIR]        (default /tmp/kmsfs-demo,
#                                                or $KMSFS_DEMO_DIR)
# Re-runnable: unmounts a previous demo mount and starts from a clean WORK_DIR.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WORK=${1:-${KMSFS_DEMO_DIR:-/tmp/kmsfs-demo}}
WORK=$(abs_path "$WORK")
KEYS=$WORK/keyring
BACKING=$WORK/backing
MNT=$WORK/mnt
LOG=$WORK/kmsfs.log
MARKER=$WORK/.kmsfs-demo

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "Setting up the machine (scripts/setup.sh)"
bash "$KMSFS_ROOT/scripts/setup.sh"

step "Building kmsfs"
kmsfs_build
echo "binary: $KMSFS"

step "Preparing $WORK"
if is_mounted "$MNT"; then
    echo "unmounting the previous demo mount at $MNT"
    force_unmount "$MNT" || die "cannot unmount $MNT; unmount it by hand (fusermount3 -uz $MNT)"
fi
if [[ -e $WORK ]]; then
    if [[ -e $MARKER ]] || [[ -z $(ls -A "$WORK") ]]; then
        rm -rf -- "$WORK"
    else
        die "$WORK exists and was not made by this demo; pick another directory (bash scripts/demo.sh DIR)"
    fi
fi
mkdir -p "$WORK" "$MNT"
touch "$MARKER"

step "Creating a keyring and an encrypted backing directory"
show "$KMSFS" init "$BACKING" --kms local --key-file "$KEYS" --key-name demo
ls -l "$KEYS"
echo
echo "Where keys live is in the trusted configuration (${KMSFS_CONFIG:-/etc/kmsfs/kmsfs.toml}), not in the"
echo "backing directory, which names the key only by provider and ID, and is authenticated:"
show "$KMSFS" providers list
show cat "$BACKING/.kmsfs-config.toml"

step "Mounting $BACKING at $MNT"
if ! show "$KMSFS" mount "$BACKING" "$MNT" --log-file "$LOG"; then
    [[ -f $LOG ]] && tail -n 30 "$LOG" >&2
    die "kmsfs mount failed"
fi
is_mounted "$MNT" || die "kmsfs mount returned 0 but $MNT is not a mount point"

SECRET="Attack at dawn. kmsfs demo written $(date -u +%Y-%m-%dT%H:%M:%SZ)"
step "Writing a file through the mount"
printf '%s\n' "$SECRET" >"$MNT/hello.txt"
mkdir -p "$MNT/projects/alpha"
head -c 200000 /dev/urandom >"$MNT/projects/alpha/random.bin"
show ls -la "$MNT"
echo
show cat "$MNT/hello.txt"

step "The same file in the backing directory is ciphertext"
show ls -la "$BACKING"
echo
echo "\$ head -c 64 $BACKING/hello.txt | xxd"
head -c 64 "$BACKING/hello.txt" | xxd
if grep -rqF "Attack at dawn" "$BACKING"; then
    die "the plaintext was found in $BACKING: it is not encrypted"
fi
echo "(grep -r 'Attack at dawn' $BACKING finds nothing)"
echo
echo "Its sidecar header holds the wrapped DEK (the KMS key never leaves the KMS):"
echo "\$ head -c 64 $BACKING/.kmsfs.hello.txt | xxd"
head -c 64 "$BACKING/.kmsfs.hello.txt" | xxd

step "Its header (kmsfs info)"
if ! show "$KMSFS" info "$MNT/hello.txt"; then
    echo "(through the mount failed; trying the backing file)"
    show "$KMSFS" info "$BACKING/hello.txt"
fi

cat <<EOF

==> Done. The encrypted file system stays mounted:
    cd $MNT            # plaintext view; files you write here are encrypted
    ls -la $BACKING    # ciphertext and .kmsfs.* sidecar headers
    $KMSFS keys list --key-file $KEYS
When finished, unmount it with:
    $KMSFS umount $MNT
Log: $LOG
EOF
