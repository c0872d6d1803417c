#!/usr/bin/env bash
# dev-moto.sh — a local AWS KMS stand-in (moto) for developing and testing
# the kmsfs `aws` provider without an AWS account.
#
# Usage:
#   scripts/dev-moto.sh start [STATE_DIR]   install moto (once), start it, create a key
#   scripts/dev-moto.sh env   [STATE_DIR]   print the export lines of a running server
#   scripts/dev-moto.sh stop  [STATE_DIR]   stop the server (idempotent; always exits 0
#                                           unless the server refuses to die)
#
#   eval "$(scripts/dev-moto.sh start)"     # then use kmsfs --kms aws ...
#
# start installs PyPI moto[server]==$MOTO_VERSION into a virtualenv
# ($KMSFS_MOTO_VENV, default ~/.cache/kmsfs-moto-venv, reused when it already
# holds that version), starts `moto_server -H 127.0.0.1 -p PORT` on a free
# loopback port in the background, waits until it answers, creates one
# symmetric ENCRYPT_DECRYPT key and the alias alias/kmsfs-dev for it (with
# boto3 from the same venv), and prints on stdout only:
#   export AWS_ENDPOINT_URL_KMS=http://127.0.0.1:PORT
#   export KMSFS_AWS_ENDPOINT=http://127.0.0.1:PORT
#   export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
#   export KMSFS_AWS_KEY_ID=<key id>  KMSFS_AWS_KEY_ARN=<key arn>
#   export KMSFS_AWS_KEY_ALIAS=alias/kmsfs-dev  KMSFS_MOTO_PID=<pid>
# Progress and errors go to stderr. If a server from the same STATE_DIR is
# still running and answering, start reuses it and just prints its env.
#
# STATE_DIR (default $KMSFS_MOTO_STATE or ~/.cache/kmsfs-moto-state) holds
# moto.pid, moto.port, moto.log and env. The credentials are moto's fixed
# dummy ones; nothing here touches a real AWS account (the server listens on
# 127.0.0.1 only).
#
# Environment:
#   KMSFS_MOTO_VENV     virtualenv path (default ~/.cache/kmsfs-moto-venv)
#   KMSFS_MOTO_STATE    default state dir
#   KMSFS_MOTO_PYTHON   python used to create the venv (default python3)
#   KMSFS_MOTO_PORT     port to use instead of a free one
set -euo pipefail

MOTO_VERSION=5.2.5
ALIAS=alias/kmsfs-dev
REGION=us-east-1

log() { printf 'dev-moto: %s\n' "$*" >&2; }
die() { printf 'dev-moto: error: %s\n' "$*" >&2; exit 1; }

cmd=${1:-}
[[ -n $cmd ]] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
STATE=${2:-${KMSFS_MOTO_STATE:-$HOME/.cache/kmsfs-moto-state}}
VENV=${KMSFS_MOTO_VENV:-$HOME/.cache/kmsfs-moto-venv}
PY=$VENV/bin/python

pid_alive() {
    # True if $1 is a live process that is our moto_server (not a reused pid).
    local pid=$1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q moto_server
}

answers() {
    # True if moto on port $1 answers HTTP.
    "$PY" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:%s/moto-api/" % sys.argv[1], timeout=2).read()
except Exception:
    sys.exit(1)
EOF
}

ensure_venv() {
    if [[ -x $PY ]] && "$PY" -c "import moto, boto3, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null \
        && [[ -x $VENV/bin/moto_server ]]; then
        return 0
    fi
    local base=${KMSFS_MOTO_PYTHON:-python3}
    command -v "$base" >/dev/null || die "$base not found; install python3 (and python3-venv on Debian)"
    log "installing moto[server]==$MOTO_VERSION into $VENV (once; takes about a minute)"
    if [[ ! -x $PY ]]; then
        "$base" -m venv "$VENV" >&2 || die "cannot create a virtualenv at $VENV (Debian: apt-get install python3-venv)"
    fi
    "$PY" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2 \
        || die "pip install moto[server]==$MOTO_VERSION failed (is PyPI reachable?)"
    "$PY" -c "import moto, boto3" || die "moto installed but does not import"
}

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

print_env() {
    [[ -f $STATE/env ]] || die "no env file in $STATE; run: $0 start $STATE"
    cat "$STATE/env"
}

do_stop() {
    local pid
    pid=$(cat "$STATE/moto.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do pid_alive "$pid" || break; sleep 0.1; done
        if pid_alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
            for _ in $(seq 20); do pid_alive "$pid" || break; sleep 0.1; done
        fi
        pid_alive "$pid" && die "moto_server (pid $pid) does not exit"
        log "stopped moto_server (pid $pid)"
    else
        log "no moto_server running for $STATE"
    fi
    rm -f "$STATE/moto.pid" "$STATE/moto.port" "$STATE/env"
}

create_key() {
    # Creates the key and alias; prints "KEY_ID KEY_ARN".
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=$REGION \
        "$PY" - "http://127.0.0.1:$1" "$ALIAS" <<'EOF'
import sys, boto3
endpoint, alias = sys.argv[1], sys.argv[2]
kms = boto3.client("kms", endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
meta = kms.create_key(Description="kmsfs dev key", KeyUsage="ENCRYPT_DECRYPT",
                      KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]
existing = {a["AliasName"] for a in kms.list_aliases()["Aliases"]}
if alias in existing:
    kms.update_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
else:
    kms.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
print(meta["KeyId"], meta["Arn"])
EOF
}

do_start() {
    mkdir -p "$STATE"
    local pid port
    pid=$(cat "$STATE/moto.pid" 2>/dev/null || true)
    port=$(cat "$STATE/moto.port" 2>/dev/null || true)
    if [[ -n $pid && -n $port && -f $STATE/env ]] && pid_alive "$pid" && [[ -x $PY ]] && answers "$port"; then
        log "reusing moto_server (pid $pid) on 127.0.0.1:$port"
        print_env
        return 0
    fi
    do_stop 2>/dev/null || true
    ensure_venv
    local tries=0
    while :; do
        tries=$((tries + 1))
        port=${KMSFS_MOTO_PORT:-$(free_port)}
        log "starting moto_server on 127.0.0.1:$port (log: $STATE/moto.log)"
        # setsid: its own session, so it outlives this script and a Ctrl-C here.
        setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$STATE/moto.log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$STATE/moto.pid"
        echo "$port" >"$STATE/moto.port"
        local ok=
        for _ in $(seq 150); do   # up to ~30 s (first start compiles .pyc)
            if ! kill -0 "$pid" 2>/dev/null; then break; fi
            if answers "$port"; then ok=1; break; fi
            sleep 0.2
        done
        [[ -n $ok ]] && break
        do_stop 2>/dev/null || true
        if [[ $tries -ge 3 || -n ${KMSFS_MOTO_PORT:-} ]]; then
            tail -n 20 "$STATE/moto.log" >&2 2>/dev/null || true
            die "moto_server did not come up on 127.0.0.1:$port (log above)"
        fi
        log "moto_server did not come up; retrying on another port"
    done
    local ids key_id key_arn
    ids=$(create_key "$port") || { do_stop 2>/dev/null || true; die "could not create the KMS key in moto"; }
    read -r key_id key_arn <<<"$ids"
    [[ -n $key_id && -n $key_arn ]] || { do_stop 2>/dev/null || true; die "moto returned no key id"; }
    local url="http://127.0.0.1:$port"
    {
        echo "export AWS_ENDPOINT_URL_KMS=$url"
        echo "export KMSFS_AWS_ENDPOINT=$url"
        echo "export AWS_ACCESS_KEY_ID=testing"
        echo "export AWS_SECRET_ACCESS_KEY=testing"
        echo "export AWS_REGION=$REGION"
        echo "export KMSFS_AWS_KEY_ID=$key_id"
        echo "export KMSFS_AWS_KEY_ARN=$key_arn"
        echo "export KMSFS_AWS_KEY_ALIAS=$ALIAS"
        echo "export KMSFS_MOTO_PID=$pid"
    } >"$STATE/env.tmp"
    mv "$STATE/env.tmp" "$STATE/env"
    log "moto_server pid $pid ready; key $key_id, alias $ALIAS"
    print_env
}

case $cmd in
    start) do_start ;;
    stop) do_stop ;;
    env) print_env ;;
    -h | --help | help) sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command $cmd (use start, stop or env)" ;;
esac
