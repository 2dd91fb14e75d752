#!/bin/sh
# Backup and restore of Quorum's three stores (deploy/README.md "Backup and restore").
#
#   deploy/backup.sh backup DIR              all three stores into DIR (created; use a new folder each time)
#   deploy/backup.sh backup-postgres FILE    registry + audit trail: pg_dump custom format
#   deploy/backup.sh restore-postgres FILE   replaces the database's content, in one transaction
#   deploy/backup.sh backup-redis FILE       a point-in-time snapshot (BGSAVE) of broker, streams, timers
#   deploy/backup.sh restore-redis FILE      stops redis, replaces its data (AOF rebuilt from the snapshot)
#   deploy/backup.sh backup-objects DIR      mirrors the image bucket and the audit-anchor bucket
#   deploy/backup.sh restore-objects DIR     mirrors them back
#
# Run from the directory of docker-compose.yml. Each store's own tool runs inside its container
# (`docker-compose exec -T`), as the store's administrator; credentials come from the secrets
# directory (QUORUM_SECRETS_DIR, default ./deploy/secrets). After restore-postgres run
# `docker-compose run --rm admin quorum audit verify`: it recomputes the hash chain and checks it against
# the anchors in the object store (a restore that lost anchored records fails there).
#
# Overrides (tests/integration/test_backup.py runs the PostgreSQL part on a local server):
#   PG_EXEC     how pg_dump / pg_restore run (default: docker-compose exec -T postgres; empty: locally,
#               with the usual PGHOST/PGPORT/PGUSER/PGPASSWORD variables)
#   PGUSER      default postgres;  PGDATABASE  default quorum
set -eu

COMPOSE=${COMPOSE:-docker-compose}
SECRETS=${QUORUM_SECRETS_DIR:-./deploy/secrets}
PG_EXEC=${PG_EXEC-$COMPOSE exec -T postgres}
PGUSER=${PGUSER:-postgres}
PGDATABASE=${PGDATABASE:-quorum}
BUCKET=${QUORUM_S3_BUCKET:-quorum}

die() { echo "backup.sh: $*" >&2; exit 1; }
say() { echo "backup.sh: $*" >&2; }

backup_postgres() {
    out=$1
    # Custom format: compressed, restorable table by table; consistent (one snapshot) while services run.
    # shellcheck disable=SC2086  # PG_EXEC is a command prefix
    $PG_EXEC pg_dump -U "$PGUSER" -d "$PGDATABASE" --format=custom --no-password > "$out.partial"
    [ -s "$out.partial" ] || die "pg_dump wrote nothing"
    mv "$out.partial" "$out"
    say "postgres: $PGDATABASE -> $out ($(wc -c < "$out") bytes)"
}

restore_postgres() {
    in=$1
    [ -s "$in" ] || die "$in: no such backup"
    # --clean --if-exists drops what the backup holds before recreating it; --single-transaction: all or
    # nothing. Stop the application services first (docker-compose stop), start them after verify.
    # shellcheck disable=SC2086
    $PG_EXEC pg_restore -U "$PGUSER" -d "$PGDATABASE" --clean --if-exists --single-transaction \
        --exit-on-error --no-password < "$in"
    say "postgres: $in -> $PGDATABASE; now run: quorum audit verify"
}

redis_cli() {
    # The operator's ACL user `admin`, over TLS (the only port), inside the redis container.
    pw=$(sed -n 's#^rediss://admin:\([^@]*\)@.*#\1#p' "$SECRETS/redis-admin.url")
    [ -n "$pw" ] || die "no admin password in $SECRETS/redis-admin.url"
    $COMPOSE exec -T -e REDISCLI_AUTH="$pw" redis \
        redis-cli --tls --cacert /etc/redis/quorum/ca.crt --user admin "$@"
}

backup_redis() {
    out=$1
    # BGSAVE replies once its child runs: in_progress is 1 from then until the snapshot is renamed into place.
    redis_cli BGSAVE >/dev/null
    while redis_cli INFO persistence | grep -q '^rdb_bgsave_in_progress:1'; do sleep 1; done
    redis_cli INFO persistence | grep -q '^rdb_last_bgsave_status:ok' || die "BGSAVE failed (redis logs)"
    $COMPOSE exec -T redis cat /data/dump.rdb > "$out.partial"
    [ -s "$out.partial" ] || die "no snapshot read"
    mv "$out.partial" "$out"
    say "redis: snapshot -> $out"
}

restore_redis() {
    in=$1
    [ -s "$in" ] || die "$in: no such backup"
    $COMPOSE stop redis
    # Redis 7 with appendonly on and no AOF would start empty: restore-snapshot.sh loads the snapshot
    # with AOF off, turns AOF on (a new AOF base from memory) and stops; then the service starts on it.
    $COMPOSE run --rm --no-deps -T -v "$(pwd)/deploy/redis/restore-snapshot.sh:/restore-snapshot.sh:ro" \
        --entrypoint sh redis /restore-snapshot.sh /data < "$in"
    $COMPOSE start redis
    say "redis: $in restored; queued tasks and timers are those of the snapshot"
}

mc_run() {
    # minio-init's image (mc) as MinIO root, with DIR mounted at /backup.
    dir=$(cd "$1" && pwd)
    shift
    $COMPOSE run --rm --no-deps -T -v "$dir:/backup" --entrypoint sh minio-init -c \
        "mc alias set quorum http://minio:9000 \"\$(cat /run/secrets/minio-root-user)\" \
         \"\$(cat /run/secrets/minio-root-password)\" >/dev/null && $*"
}

backup_objects() {
    mkdir -p "$1"
    mc_run "$1" "mc mirror --overwrite quorum/$BUCKET /backup/$BUCKET && mc mirror --overwrite quorum/$BUCKET-audit /backup/$BUCKET-audit"
    say "objects: buckets $BUCKET, $BUCKET-audit -> $1"
}

restore_objects() {
    [ -d "$1/$BUCKET" ] || die "$1/$BUCKET: no such backup"
    # Anchors come back without their COMPLIANCE retention (mc mirror copies content, not locks);
    # objects already in the bucket are kept (object lock forbids overwriting anchors anyway).
    mc_run "$1" "mc mirror /backup/$BUCKET quorum/$BUCKET && mc mirror /backup/$BUCKET-audit quorum/$BUCKET-audit"
    say "objects: $1 -> buckets $BUCKET, $BUCKET-audit"
}

[ $# -eq 2 ] || die "usage: $0 backup|backup-postgres|restore-postgres|backup-redis|restore-redis|backup-objects|restore-objects PATH"
case $1 in
    backup)
        mkdir -p "$2"
        backup_postgres "$2/postgres.dump"
        backup_redis "$2/redis.rdb"
        backup_objects "$2/objects"
        ;;
    backup-postgres) backup_postgres "$2" ;;
    restore-postgres) restore_postgres "$2" ;;
    backup-redis) backup_redis "$2" ;;
    restore-redis) restore_redis "$2" ;;
    backup-objects) backup_objects "$2" ;;
    restore-objects) restore_objects "$2" ;;
    *) die "unknown command $1" ;;
esac
