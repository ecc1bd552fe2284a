#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster for the tests: initdb into a temporary folder, listen on 127.0.0.1 only,
# trust authentication (loopback, throwaway data). Prints the DSN the tests read (CENTERID_TEST_DATABASE_URL).
#
#   scripts/pg-test-cluster.sh start [PGDATA] [PORT]    idempotent: a running cluster is left as it is
#   scripts/pg-test-cluster.sh stop  [PGDATA]
#
# PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user (Debian's package
# creates it). Needs Debian's postgresql-15 (apt-get install -y postgresql-15).
set -euo pipefail
ACTION=${1:-start}
PGDATA=${2:-/tmp/centerid-pgdata}
PORT=${3:-55432}
BIN=/usr/lib/postgresql/15/bin
[ -x "$BIN/pg_ctl" ] || { echo "PostgreSQL 15 is not installed ($BIN/pg_ctl missing): apt-get install -y postgresql-15" >&2; exit 1; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$(printf '%q ' "$@")"; else "$@"; fi
}

case "$ACTION" in
  start)
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
      mkdir -p "$PGDATA"
      [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDATA"
      as_owner "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    if ! as_owner "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
      as_owner "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w \
        -o "-k /tmp -p $PORT -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=on" start >/dev/null
    fi
    echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
    ;;
  stop)
    as_owner "$BIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null
    ;;
  *)
    echo "usage: $0 start|stop [PGDATA] [PORT]" >&2; exit 2
    ;;
esac
