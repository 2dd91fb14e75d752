#!/bin/sh
# Rebuild Redis's data directory from a snapshot (dump.rdb on standard input), run by
# `deploy/backup.sh restore-redis` in a one-off redis container while the redis service is stopped.
#
# Redis 7 started with appendonly on and no AOF starts EMPTY (it ignores dump.rdb), so: load the
# snapshot with AOF off, switch AOF on (Redis writes a new AOF base from memory), wait for that rewrite,
# shut down. The next normal start loads the new AOF. Tested by tests/integration/test_backup.py.
#
#   sh restore-snapshot.sh DATA_DIR < dump.rdb
# RUN_AS (default `gosu redis` in the image) runs redis-server as the image's user; PORT: a loopback
# port for this one-off server (default 6399).
set -eu
dir=$1
port=${PORT:-6399}
run_as=${RUN_AS-gosu redis}
cli() { redis-cli -p "$port" "$@"; }

rm -rf "$dir/appendonlydir" "$dir/dump.rdb"
cat > "$dir/dump.rdb"
[ -s "$dir/dump.rdb" ] || { echo "restore-snapshot: empty snapshot" >&2; exit 1; }
if [ -n "$run_as" ]; then chown -R redis:redis "$dir"; fi
# shellcheck disable=SC2086  # run_as is a command prefix
$run_as redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --appendonly no --save "" \
    --daemonize yes --pidfile "$dir/restore.pid" --logfile "$dir/restore.log"
until [ "$(cli ping 2>/dev/null)" = "PONG" ]; do sleep 0.2; done   # LOADING until the snapshot is in
keys=$(cli dbsize)
cli config set appendonly yes >/dev/null
until cli info persistence | grep -q '^aof_rewrite_in_progress:0' \
   && cli info persistence | grep -q '^aof_rewrite_scheduled:0' \
   && cli info persistence | grep -q '^aof_enabled:1' \
   && [ -f "$dir/appendonlydir/appendonly.aof.manifest" ]; do sleep 0.2; done
cli shutdown nosave >/dev/null 2>&1 || true
while [ -f "$dir/restore.pid" ] && kill -0 "$(cat "$dir/restore.pid")" 2>/dev/null; do sleep 0.2; done
rm -f "$dir/restore.log"
echo "restore-snapshot: $keys keys; AOF rebuilt in $dir/appendonlydir"
