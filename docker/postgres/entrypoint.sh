#!/bin/sh
# The first start initialises $PGDATA: a superuser $POSTGRES_USER (default mlflow)
# whose password comes from $POSTGRES_PASSWORD_FILE (a secret) or $POSTGRES_PASSWORD,
# SCRAM authentication for every connection, and a database $POSTGRES_DB (default
# mlflow). Later starts reuse it. The server listens on every address of the
# container: compose keeps it on the project's network, unpublished.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
user=${POSTGRES_USER:-mlflow}
database=${POSTGRES_DB:-mlflow}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        password=$(cat "$POSTGRES_PASSWORD_FILE")
    else
        password=${POSTGRES_PASSWORD:-}
    fi
    if [ -z "$password" ]; then
        echo "error: POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE must give the database password" >&2
        exit 2
    fi
    # The password reaches initdb through a file only this user can read, never argv.
    pwfile=$(mktemp)
    printf '%s\n' "$password" > "$pwfile"
    "$bin/initdb" -D "$PGDATA" -U "$user" -A scram-sha-256 --pwfile="$pwfile" --encoding=UTF8 --locale=C >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE \"$database\"" | "$bin/postgres" --single -D "$PGDATA" -j postgres >/dev/null
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
