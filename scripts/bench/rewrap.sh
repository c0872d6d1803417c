#!/usr/bin/env bash
# rewrap.sh — what `kmsfs rewrap` costs on a real KMS API: N files (default
# 20000) written through a mount on the dev OpenBao (transit) and on moto
# (AWS KMS), the key rotated (OpenBao) or not (AWS keeps versions inside its
# ciphertext, so `--all` is used), then `kmsfs rewrap --json` timed, and the
# KMS requests it made counted where the server sees them (OpenBao's file
# audit device; moto's request log).
#
# Usage: scripts/bench/rewrap.sh [--files N] [--kms vault,aws] [--out FILE]
# Prints one JSON line per KMS; --out also writes them to FILE.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh

files=20000 kmss=vault,aws out=
while [[ $# -gt 0 ]]; do
    case $1 in
        --files) files=$2; shift 2 ;;
        --kms) kmss=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "usage: $0 [--files N] [--kms vault,aws] [--out FILE]" >&2; exit 2 ;;
    esac
done

cargo build --release --all-features >&2
KMSFS=$CARGO_TARGET_DIR/release/kmsfs
work=$(mktemp -d /tmp/kmsfs-rewrap-bench.XXXXXX)
export KMSFS_CONFIG=$work/kmsfs.toml
cleanup() {
    for m in "$work"/mnt-*; do
        [[ -d $m ]] && { "$KMSFS" umount "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true; }
    done
    [[ -d $work/vault ]] && scripts/dev-vault.sh stop "$work/vault" >/dev/null 2>&1 || true
    [[ -d $work/moto ]] && scripts/dev-moto.sh stop "$work/moto" >/dev/null 2>&1 || true
    rm -rf -- "$work"
}
trap cleanup EXIT

# Writes $files small files through a mount of $1 (in 100 directories).
fill() {
    local backing=$1 mnt=$work/mnt-$2
    mkdir -p "$mnt"
    "$KMSFS" mount "$backing" "$mnt" --log-file "$work/$2.log" >&2
    python3 - "$mnt" "$files" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i % 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
        f.write(b"x" * 1000)
PY
    "$KMSFS" umount "$mnt" >&2
}

# Runs the rewrap, prints "seconds summary-json".
timed_rewrap() {
    local start end
    start=$(date +%s.%N)
    "$KMSFS" rewrap "$@" --json >"$work/summary.json"
    end=$(date +%s.%N)
    python3 -c "print(round($end - $start, 2))"
}

results=()
IFS=, read -ra which <<<"$kmss"
for kms in "${which[@]}"; do
    case $kms in
    vault)
        eval "$(scripts/dev-vault.sh start "$work/vault" lifecycle)"
        "$KMSFS" init "$work/vb" --kms vault --vault-addr "$VAULT_ADDR" --vault-key "$KMSFS_VAULT_KEY" >&2
        fill "$work/vb" vault
        "$KMSFS_VAULT_BAO" write -f "transit/keys/$KMSFS_VAULT_KEY/rotate" >/dev/null
        lines=$(wc -l <"$KMSFS_VAULT_AUDIT")
        before=$(grep -c '"type":"request"' "$KMSFS_VAULT_AUDIT" || true)
        secs=$(timed_rewrap "$work/vb")
        after=$(grep -c '"type":"request"' "$KMSFS_VAULT_AUDIT" || true)
        transit=$(tail -n +"$((lines + 1))" "$KMSFS_VAULT_AUDIT" | grep '"type":"request"' | grep -c 'transit/\(en\|de\)crypt' || true)
        ;;
    aws)
        eval "$(scripts/dev-moto.sh start "$work/moto")"
        "$KMSFS" init "$work/ab" --kms aws --aws-key-id "$KMSFS_AWS_KEY_ARN" --aws-region us-east-1 \
            --aws-endpoint "$KMSFS_AWS_ENDPOINT" >&2
        fill "$work/ab" aws
        log=$work/moto/moto.log
        before=$(grep -c '"POST / ' "$log" || true)
        secs=$(timed_rewrap "$work/ab" --all)
        after=$(grep -c '"POST / ' "$log" || true)
        transit=$((after - before))
        ;;
    *) echo "unknown KMS $kms" >&2; exit 2 ;;
    esac
    line=$(python3 - "$kms" "$files" "$secs" "$((after - before))" "$transit" "$work/summary.json" <<'PY'
import json, sys
kms, files, secs, requests, crypto, path = sys.argv[1:]
s = json.load(open(path))
print(json.dumps({"kms": kms, "files": int(files), "rewrapped": s["changed"],
                  "seconds": float(secs), "files_per_second": round(int(files) / float(secs)),
                  "kms_requests": int(requests), "crypto_requests": int(crypto),
                  "kms_batches": s["kms_batches"], "failed": s["failed"]}))
PY
)
    echo "$line"
    results+=("$line")
done
if [[ -n $out ]]; then printf '%s\n' "${results[@]}" >"$out"; fi
