#!/usr/bin/env bash
# Debian's redis-server with AOF on, on loopback and a free port.
#
#   redis.sh start|stop|kill|restart|status [STATE_DIR]
#   redis.sh install
#
# If DRIFTLINE_REDIS_URL is set, nothing is started: that server is pinged and used.
# stdout of `start`: DRIFTLINE_REDIS_URL=..., DRIFTLINE_REDIS_VERSION=..., DRIFTLINE_REDIS_LOG=...

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Redis answers within a second of exec; replaying a large AOF can take longer.
START_TIMEOUT="${DRIFTLINE_REDIS_START_TIMEOUT:-60}"
# SIGTERM makes Redis fsync the AOF and exit; that takes well under a second.
# shellcheck disable=SC2034  # read by service_stop in lib.sh
STOP_GRACE=15

ensure_installed() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        apt_install redis-server redis-tools || die "could not install redis-server"
    fi
}

ping_redis() {
    [[ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]]
}

launch() {
    # --daemonize no: we keep the pid; --save "": AOF is the persistence in use.
    spawn "$DIR/pid" "$DIR/redis.log" redis-server \
        --port "$1" --bind 127.0.0.1 --protected-mode yes \
        --dir "$DIR/data" --appendonly yes --appendfsync everysec --save "" \
        --daemonize no --logfile "" --pidfile "$DIR/redis-server.pid"
}

print_env() {
    echo "DRIFTLINE_REDIS_URL=redis://127.0.0.1:$(cat "$DIR/port")/0"
    echo "DRIFTLINE_REDIS_VERSION=$(cat "$DIR/version")"
    echo "DRIFTLINE_REDIS_LOG=$DIR/redis.log"
}

cmd_start() {
    if [[ -n "${DRIFTLINE_REDIS_URL:-}" ]]; then
        log "using the Redis server at $DRIFTLINE_REDIS_URL (DRIFTLINE_REDIS_URL)"
        if command -v redis-cli >/dev/null; then
            local deadline=$((SECONDS + 30))
            until [[ "$(redis-cli -u "$DRIFTLINE_REDIS_URL" ping 2>/dev/null)" == PONG ]]; do
                ((SECONDS < deadline)) || die "DRIFTLINE_REDIS_URL=$DRIFTLINE_REDIS_URL does not answer PING"
                sleep 0.5
            done
        fi
        echo "DRIFTLINE_REDIS_URL=$DRIFTLINE_REDIS_URL"
        echo "DRIFTLINE_REDIS_VERSION="
        return 0
    fi
    ensure_installed
    DIR="$(resolve_state_dir "${1:-}")/redis"
    mkdir -p "$DIR/data"
    if ! pid_alive "$DIR/pid"; then
        redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p' >"$DIR/version"
        start_service "$DIR" "Redis $(cat "$DIR/version")" "$START_TIMEOUT" "$DIR/redis.log" \
            launch ping_redis
    fi
    print_env
}

service_main redis DRIFTLINE_REDIS_URL ping_redis install ensure_installed "$@"
