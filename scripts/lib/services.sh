# shellcheck shell=bash
#
# scripts/lib/services.sh — helpers that install and start the real services that
# ebb's tests, demo and bench use. Source it; do not run it.
#
#   ensure_apt PKG...   install the Debian packages that are missing
#   ensure_moto         make a virtualenv at $EBB_VENV (default <repo>/.venv) with
#                       moto's S3 server in it
#   start_moto          start moto_server on a free loopback port, wait until it
#                       answers, export EBB_TEST_S3_ENDPOINT and the AWS_* variables
#                       the tests use, and stop it again when the shell exits
#   stop_moto           stop the moto server started by start_moto (idempotent)
#   ebb_at_exit CMD     run CMD (a string, eval'd) when the shell exits; the commands
#                       run newest first. Scripts that source this file should use it
#                       instead of their own `trap ... EXIT`, which would replace it.
#
# Every helper prints one short line per action to stderr, prefixed "ebb:".

if [[ -n "${EBB_SERVICES_SH_LOADED:-}" ]]; then
    return 0
fi
EBB_SERVICES_SH_LOADED=1

# The repository root: two levels up from this file.
EBB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EBB_VENV="${EBB_VENV:-$EBB_ROOT/.venv}"

ebb_log() {
    printf 'ebb: %s\n' "$*" >&2
}

ebb_die() {
    printf 'ebb: error: %s\n' "$*" >&2
    exit 1
}

EBB_AT_EXIT=()

ebb_run_at_exit() {
    local i
    for ((i = ${#EBB_AT_EXIT[@]} - 1; i >= 0; i--)); do
        eval "${EBB_AT_EXIT[i]}" || true
    done
    EBB_AT_EXIT=()
}

ebb_at_exit() {
    EBB_AT_EXIT+=("$1")
    trap ebb_run_at_exit EXIT
    # Turn Ctrl-C and kill into a normal exit so that the EXIT commands run.
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# ensure_apt PKG... — install the named Debian packages that are not installed yet.
# Runs `apt-get update` once per shell, and only when something is missing.
ensure_apt() {
    local missing=() pkg
    for pkg in "$@"; do
        # A removed package whose config files remain is "deinstall ok config-files".
        if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || ebb_die "need root (or sudo) to install: ${missing[*]}"
        sudo=(sudo)
    fi
    ebb_log "installing Debian packages: ${missing[*]}"
    local log
    log="$(mktemp -t ebb-apt.XXXXXX)"
    if [[ -z "${EBB_APT_UPDATED:-}" ]]; then
        if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            rm -f "$log"
            ebb_die "apt-get update failed"
        fi
        EBB_APT_UPDATED=1
    fi
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        ebb_die "apt-get install failed for: ${missing[*]}"
    fi
    rm -f "$log"
}

# ensure_moto — a virtualenv at $EBB_VENV with moto's S3 server installed.
ensure_moto() {
    if [[ -x "$EBB_VENV/bin/moto_server" ]]; then
        return 0
    fi
    local python
    python="$(command -v python3)" || ebb_die "python3 is not installed"
    if [[ ! -x "$EBB_VENV/bin/python" ]]; then
        ebb_log "creating virtualenv $EBB_VENV"
        if ! "$python" -m venv "$EBB_VENV" >&2; then
            # Debian's own python3 needs the python3-venv package for `-m venv`.
            rm -rf "$EBB_VENV"
            ensure_apt python3-venv
            "$python" -m venv "$EBB_VENV" >&2 || ebb_die "could not create a virtualenv at $EBB_VENV"
        fi
    fi
    ebb_log "installing moto[server] into $EBB_VENV"
    "$EBB_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]" >&2 \
        || ebb_die "pip install \"moto[server]\" failed"
    [[ -x "$EBB_VENV/bin/moto_server" ]] || ebb_die "moto installed but $EBB_VENV/bin/moto_server is missing"
}

# ebb_free_port — print a TCP port on 127.0.0.1 that nobody listens on right now.
ebb_free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

EBB_MOTO_PID=""
EBB_MOTO_DIR=""

# start_moto — start moto_server on a free loopback port and export:
#   EBB_TEST_S3_ENDPOINT=http://127.0.0.1:PORT
#   AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
# The server is stopped by stop_moto, which also runs when the shell exits
# (through ebb_at_exit).
start_moto() {
    [[ -x "$EBB_VENV/bin/moto_server" ]] || ensure_moto
    command -v curl >/dev/null || ensure_apt curl
    if [[ -n "$EBB_MOTO_PID" ]] && kill -0 "$EBB_MOTO_PID" 2>/dev/null; then
        ebb_log "moto already running (pid $EBB_MOTO_PID) at $EBB_TEST_S3_ENDPOINT"
        return 0
    fi
    EBB_MOTO_DIR="$(mktemp -d -t ebb-moto.XXXXXX)"
    local log="$EBB_MOTO_DIR/moto.log" port attempt
    # A port found free can be taken before moto binds it; try a few.
    for attempt in 1 2 3; do
        port="$(ebb_free_port)"
        "$EBB_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
        EBB_MOTO_PID=$!
        if ((attempt == 1)); then
            ebb_at_exit stop_moto
        fi
        local deadline=$((SECONDS + 30))
        while ((SECONDS < deadline)); do
            if ! kill -0 "$EBB_MOTO_PID" 2>/dev/null; then
                break
            fi
            # Any HTTP answer at all means the server is up.
            if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/" 2>/dev/null; then
                export EBB_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
                # Tests that stop and resume a server of their own start it from here.
                export EBB_TEST_MOTO_SERVER="$EBB_VENV/bin/moto_server"
                export AWS_ACCESS_KEY_ID=testing
                export AWS_SECRET_ACCESS_KEY=testing
                export AWS_DEFAULT_REGION=us-east-1
                ebb_log "moto S3 server up at $EBB_TEST_S3_ENDPOINT (pid $EBB_MOTO_PID, log $log)"
                return 0
            fi
            sleep 0.2
        done
        if kill -0 "$EBB_MOTO_PID" 2>/dev/null; then
            # Alive but silent for 30 s: give up, do not retry.
            kill "$EBB_MOTO_PID" 2>/dev/null || true
            wait "$EBB_MOTO_PID" 2>/dev/null || true
            EBB_MOTO_PID=""
            printf 'ebb: error: moto_server did not answer on 127.0.0.1:%s within 30 s; last lines of %s:\n' "$port" "$log" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        wait "$EBB_MOTO_PID" 2>/dev/null || true
        EBB_MOTO_PID=""
        ebb_log "moto_server exited at start (attempt $attempt, port $port)"
    done
    printf 'ebb: error: moto_server would not start; last lines of %s:\n' "$log" >&2
    tail -n 20 "$log" >&2
    exit 1
}

# stop_moto — stop the server started by start_moto. Safe to call twice.
stop_moto() {
    if [[ -n "$EBB_MOTO_PID" ]]; then
        if kill -0 "$EBB_MOTO_PID" 2>/dev/null; then
            kill "$EBB_MOTO_PID" 2>/dev/null || true
            wait "$EBB_MOTO_PID" 2>/dev/null || true
            ebb_log "moto S3 server stopped"
        fi
        EBB_MOTO_PID=""
    fi
    if [[ -n "$EBB_MOTO_DIR" ]]; then
        rm -rf "$EBB_MOTO_DIR"
        EBB_MOTO_DIR=""
    fi
}
