#!/usr/bin/env bash
# Runs CMD with real services on loopback, then stops them whatever happens:
#   - a throwaway PostgreSQL cluster in a temp dir (127.0.0.1 only, unix socket in the temp dir),
#   - an Unleash server (tests/services/unleash.mjs) on that PostgreSQL.
# Prometheus is not started here: its scrape targets are only known inside the test
# session, so tests start it themselves (tests/services_fixtures.py); this script checks
# that `prometheus` and `promtool` are on PATH.
#
# CMD sees:
#   STRANGLER_TEST_UNLEASH_URL           http://127.0.0.1:PORT
#   STRANGLER_TEST_UNLEASH_ADMIN_TOKEN   admin API token (header `Authorization: <token>`)
#   STRANGLER_TEST_UNLEASH_CLIENT_TOKEN  backend (client API) token, environment development
#   STRANGLER_TEST_CLIENT_SPEC_DIR       specifications folder of @unleash/client-specification
#   STRANGLER_TEST_PROMETHEUS            path of the prometheus binary
# The script exits with CMD's status (130/143 when interrupted).
#
# Install the dependencies first: tests/services/install.sh

# Functions below run from traps, which shellcheck cannot see.
# shellcheck disable=SC2317
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 CMD [ARG...]" >&2
    exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
started_at=$(date +%s.%N)
startup_timeout=${STRANGLER_TEST_SERVICES_TIMEOUT:-90}

say() { echo "run-with-services: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# --- what is needed -------------------------------------------------------------------

pg_bin=""
for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    if [[ -x $dir/initdb && -x $dir/postgres && -x $dir/pg_isready ]]; then
        pg_bin=$dir
        break
    fi
done
if [[ -z $pg_bin ]] && command -v initdb >/dev/null 2>&1; then
    pg_bin=$(dirname "$(readlink -f "$(command -v initdb)")")
fi
[[ -n $pg_bin && -x $pg_bin/postgres ]] ||
    die "PostgreSQL server binaries (initdb, postgres) not found; run tests/services/install.sh"

prometheus=$(command -v prometheus) || die "prometheus is not on PATH; run tests/services/install.sh"
command -v promtool >/dev/null 2>&1 || die "promtool is not on PATH; run tests/services/install.sh"
command -v node >/dev/null 2>&1 || die "node is not on PATH"
command -v python3 >/dev/null 2>&1 || die "python3 is not on PATH"
[[ -f $here/node_modules/unleash-server/package.json ]] ||
    die "unleash-server is not installed in tests/services/node_modules; run tests/services/install.sh"
spec_dir=$here/node_modules/@unleash/client-specification/specifications
[[ -d $spec_dir ]] || die "$spec_dir is missing; run tests/services/install.sh"

# PostgreSQL refuses to run as root: as root, the cluster belongs to user postgres.
# setpriv execs without forking, so the server stays this shell's own child.
as_pg=()
if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "user postgres does not exist; run tests/services/install.sh"
    command -v setpriv >/dev/null 2>&1 || die "setpriv (util-linux) is not on PATH"
    as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

# --- clean-up on every exit path ------------------------------------------------------

tmp=""
pg_pid=""
unleash_pid=""
watchdog_pid=""
cmd_pid=""
interrupted=""

# Signals pid and waits for it (it is a child of this shell) for up to 10 s, then kills it.
stop_child() {
    local pid=$1 signal=$2 i
    kill "-$signal" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_services() {
    if [[ -n $watchdog_pid ]]; then
        kill -TERM -- "-$watchdog_pid" 2>/dev/null || true
        watchdog_pid=""
    fi
    if [[ -n $unleash_pid ]]; then
        stop_child "$unleash_pid" TERM
        unleash_pid=""
    fi
    if [[ -n $pg_pid ]]; then
        # SIGQUIT is PostgreSQL's immediate shutdown: the data is thrown away anyway.
        stop_child "$pg_pid" QUIT
        pg_pid=""
    fi
    if [[ -n $tmp ]]; then
        rm -rf "$tmp"
        tmp=""
    fi
}

on_exit() {
    local status=$?
    trap - EXIT INT TERM HUP
    stop_services
    exit "$status"
}

# While CMD runs, a signal lets it finish first (its own teardown may need the services).
# Ctrl-C already reached CMD through the terminal; TERM or HUP sent to this shell alone
# (a CI timeout, say) is passed on as TERM.
on_signal() {
    interrupted=$2
    if [[ -z $cmd_pid ]]; then
        exit "$2"
    fi
    if [[ $1 != INT ]]; then
        kill -TERM "$cmd_pid" 2>/dev/null || true
    fi
}
trap on_exit EXIT
trap 'on_signal HUP 129' HUP
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

tail_log() {
    if [[ -f $1 ]]; then
        say "last lines of $(basename "$1"):"
        tail -n "${2:-40}" "$1" | sed 's/^/    /' >&2
    fi
}

# --- PostgreSQL -----------------------------------------------------------------------

# Both ports are taken while the other is still bound, so they differ.
read -r pg_port unleash_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')

# Under /tmp (not $TMPDIR) when root: user postgres must be able to reach the directory.
if [[ $(id -u) -eq 0 ]]; then
    tmp=$(mktemp -d /tmp/strangler-services.XXXXXX)
    chown postgres: "$tmp"
else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/strangler-services.XXXXXX")
fi

# Stops PostgreSQL and removes the temp dir should this shell die without running its
# traps (SIGKILL); Unleash notices its parent's death by itself.
# shellcheck disable=SC2016 # expanded by the inner bash
setsid bash -c '
    while kill -0 "$1" 2>/dev/null && [[ -d $2 ]]; do sleep 1; done
    pid=$(head -n 1 "$2/pgdata/postmaster.pid" 2>/dev/null) && kill -QUIT "$pid" 2>/dev/null
    sleep 2
    rm -rf "$2"
' watchdog "$$" "$tmp" </dev/null >/dev/null 2>&1 &
watchdog_pid=$!

if ! (cd "$tmp" && "${as_pg[@]}" "$pg_bin/initdb" -D "$tmp/pgdata" -U postgres -A trust \
    -E UTF8 --locale=C --no-sync --no-instructions) >"$tmp/initdb.log" 2>&1; then
    tail_log "$tmp/initdb.log"
    die "initdb failed"
fi
# setsid: a Ctrl-C in the terminal reaches CMD, not the services; the trap stops them.
# fsync and friends off: the cluster lives for one test run.
(cd "$tmp" && exec setsid "${as_pg[@]}" "$pg_bin/postgres" -D "$tmp/pgdata" \
    -c listen_addresses=127.0.0.1 -p "$pg_port" -k "$tmp" \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off) \
    </dev/null >"$tmp/postgres.log" 2>&1 &
pg_pid=$!
deadline=$((SECONDS + 30))
until "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"; do
    if ! kill -0 "$pg_pid" 2>/dev/null || ((SECONDS >= deadline)); then
        tail_log "$tmp/postgres.log"
        die "PostgreSQL did not start on 127.0.0.1:$pg_port"
    fi
    sleep 0.1
done
"$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres unleash ||
    die "could not create database unleash"

# --- Unleash --------------------------------------------------------------------------

secret() { od -An -N12 -tx1 /dev/urandom | tr -d ' \n'; }
admin_token="*:*.strangler-admin-$(secret)"
client_token="default:development.strangler-client-$(secret)"
unleash_url=http://127.0.0.1:$unleash_port

INIT_ADMIN_API_TOKENS=$admin_token \
    INIT_BACKEND_API_TOKENS=$client_token \
    CHECK_VERSION=false \
    SEND_TELEMETRY=false \
    setsid node "$here/unleash.mjs" --port "$unleash_port" \
    --database-url "postgres://postgres@127.0.0.1:$pg_port/unleash" \
    </dev/null >"$tmp/unleash.log" 2>&1 &
unleash_pid=$!

if ! python3 - "$unleash_url/health" "$unleash_pid" "$startup_timeout" <<'EOF'; then
import os
import sys
import time
import urllib.request

url, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("Unleash exited before it became healthy")
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"Unleash was not healthy at {url} after {timeout:g} s")
EOF
    tail_log "$tmp/unleash.log"
    die "Unleash did not start"
fi

export STRANGLER_TEST_UNLEASH_URL=$unleash_url
export STRANGLER_TEST_UNLEASH_ADMIN_TOKEN=$admin_token
export STRANGLER_TEST_UNLEASH_CLIENT_TOKEN=$client_token
export STRANGLER_TEST_CLIENT_SPEC_DIR=$spec_dir
export STRANGLER_TEST_PROMETHEUS=$prometheus

say "PostgreSQL on 127.0.0.1:$pg_port, Unleash on $unleash_url," \
    "up in $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
        "$started_at" "$(date +%s.%N)") s"

# --- CMD ------------------------------------------------------------------------------

# In the background so that the traps run at once; with this shell's stdin, and with
# SIGINT and SIGQUIT back to their defaults (bash ignores them in background jobs).
(
    trap - INT QUIT
    exec "$@"
) <&0 &
cmd_pid=$!
while kill -0 "$cmd_pid" 2>/dev/null; do
    wait "$cmd_pid" || true
done
status=0
wait "$cmd_pid" || status=$?
exit "${interrupted:-$status}"
