#!/usr/bin/env bash
# Installs what the real-services tests need, and only what is missing:
#   - PostgreSQL server binaries (Debian package `postgresql`),
#   - Prometheus and promtool (Debian package `prometheus`, without its recommended exporters),
#   - unleash-server and @unleash/client-specification from package-lock.json (npm ci).
# Idempotent; when everything is present it only checks and returns.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

have_postgres_server() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        if [[ -x $dir/initdb && -x $dir/pg_ctl && -x $dir/postgres ]]; then
            return 0
        fi
    done
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1
}

have_prometheus() {
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1
}

apt_updated=0
apt_install() {
    local -a sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || {
            echo "install.sh: need root (or sudo) to apt-get install $*" >&2
            exit 1
        }
        sudo=(sudo)
    fi
    if [[ $apt_updated -eq 0 ]]; then
        echo "install.sh: apt-get update"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        apt_updated=1
    fi
    echo "install.sh: apt-get install -y $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

if ! have_postgres_server; then
    apt_install postgresql
fi

if ! have_prometheus; then
    apt_install --no-install-recommends prometheus
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "install.sh: node and npm are required (Node 20 or newer) to run the Unleash server" >&2
    exit 1
fi

# npm ci records what it installed in node_modules/.package-lock.json; a lockfile newer
# than that record means the dependencies changed.
installed_record=$here/node_modules/.package-lock.json
if [[ ! -f $installed_record || $here/package-lock.json -nt $installed_record ]]; then
    echo "install.sh: npm ci in tests/services (unleash-server, @unleash/client-specification)"
    # --ignore-scripts: an install script of a dependency phones an analytics host.
    (cd "$here" && SCARF_ANALYTICS=false npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
