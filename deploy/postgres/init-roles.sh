#!/bin/sh
# Runs once, when the postgres container initialises an empty data directory
# (docker-compose.yml mounts it into /docker-entrypoint-initdb.d). Creates the least-privilege roles:
#   quorum    owner of database `quorum` (registry, audit trail, migrations): the services' login
#   exporter  pg_monitor only: postgres_exporter
# Passwords come from the compose secrets written by `quorum deploy init`. The superuser's password
# (POSTGRES_PASSWORD_FILE) is used by nothing else. Tested by tests/integration/test_backup.py.
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=quorum}"
: "${QUORUM_SECRETS:=/run/secrets}" "${QUORUM_APP_ROLE:=quorum}" "${QUORUM_EXPORTER_ROLE:=exporter}"
app_pw=$(cat "$QUORUM_SECRETS/postgres-app-password")
exporter_pw=$(cat "$QUORUM_SECRETS/postgres-exporter-password")
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v app_pw="$app_pw" -v exporter_pw="$exporter_pw" -v db="$POSTGRES_DB" \
     -v app="$QUORUM_APP_ROLE" -v exporter="$QUORUM_EXPORTER_ROLE" <<'SQL'
CREATE ROLE :"app" LOGIN PASSWORD :'app_pw';
ALTER DATABASE :"db" OWNER TO :"app";
ALTER SCHEMA public OWNER TO :"app";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"app";
CREATE ROLE :"exporter" LOGIN PASSWORD :'exporter_pw';
GRANT pg_monitor TO :"exporter";
GRANT CONNECT ON DATABASE :"db" TO :"exporter";
SQL
