#!/usr/bin/env bash
# The local stack: Kafka, Redis, Prometheus and Alertmanager on loopback, free ports, one
# temporary state directory.
#
#   stack.sh start [SERVICE...]     start (default: all four); print the env file
#   stack.sh stop [STATE_DIR] [--keep]  stop what start started; remove the directory if
#                                   start created it
#   stack.sh env [STATE_DIR]        print the env file
#
# The state directory is $DRIFTLINE_STACK_DIR if set, else a new temp directory. Without a
# STATE_DIR argument, stop/env use $DRIFTLINE_STACK_DIR, else the last stack started here.
# The env file (STATE_DIR/stack.env) has one KEY=VALUE a line:
#   DRIFTLINE_STACK_DIR, DRIFTLINE_KAFKA_BOOTSTRAP, DRIFTLINE_KAFKA_VERSION,
#   DRIFTLINE_REDIS_URL, DRIFTLINE_REDIS_VERSION, DRIFTLINE_PROMETHEUS_URL,
#   DRIFTLINE_ALERTMANAGER_URL, ... (and each service's log file)
# DRIFTLINE_STACK_OWNER_PID: when set, a watchdog stops the stack once that process is gone,
# so a test run killed outright leaves no broker behind.
# Load it into a shell with: eval "$(deploy/local/stack.sh env | sed 's/^/export /')"

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_SERVICES=(kafka redis alertmanager prometheus)
LAST_STACK_FILE="$DRIFTLINE_CACHE_DIR/last-stack"

pick_dir() {
    local dir="${1:-${DRIFTLINE_STACK_DIR:-}}"
    if [[ -z "$dir" && -s "$LAST_STACK_FILE" ]]; then
        dir="$(cat "$LAST_STACK_FILE")"
    fi
    [[ -n "$dir" ]] || die "no stack directory given and no stack started here"
    echo "$dir"
}

has_service() {
    local want="$1" s
    shift
    for s in "$@"; do [[ "$s" == "$want" ]] && return 0; done
    return 1
}

cmd_stop() {
    local dir="$1" keep="$2" s
    [[ -d "$dir" ]] || return 0
    stop_pid "$dir/watchdog.pid" 5
    # Reverse start order: Prometheus stops before the Alertmanager it sends to.
    for s in prometheus alertmanager redis kafka; do
        if [[ -f "$dir/$s/pid" ]]; then
            "$DEPLOY_LOCAL_DIR/$s.sh" stop "$dir" || log "stopping $s failed"
        fi
    done
    if [[ "$keep" == 0 && -f "$dir/.driftline-stack" ]]; then
        rm -rf "$dir"
        log "stopped the stack and removed $dir"
    else
        log "stopped the stack in $dir"
    fi
    if [[ -s "$LAST_STACK_FILE" && "$(cat "$LAST_STACK_FILE")" == "$dir" ]]; then
        rm -f "$LAST_STACK_FILE"
    fi
}

cmd_start() {
    local services=("$@") s
    ((${#services[@]})) || services=("${ALL_SERVICES[@]}")
    for s in "${services[@]}"; do
        has_service "$s" "${ALL_SERVICES[@]}" || die "unknown service '$s' (have: ${ALL_SERVICES[*]})"
    done
    # Only a directory this script made is removed on stop; a caller's own directory stays.
    local dir created=0
    [[ -z "${DRIFTLINE_STACK_DIR:-}" || ! -e "${DRIFTLINE_STACK_DIR:-}" ]] && created=1
    dir="$(resolve_state_dir "")"
    [[ $created == 1 ]] && touch "$dir/.driftline-stack"
    mkdir -p "$DRIFTLINE_CACHE_DIR"
    echo "$dir" >"$LAST_STACK_FILE"
    local t0=$SECONDS
    if [[ -n "${DRIFTLINE_STACK_OWNER_PID:-}" ]]; then
        spawn "$dir/watchdog.pid" /dev/null "$DEPLOY_LOCAL_DIR/watchdog.sh" \
            "$DRIFTLINE_STACK_OWNER_PID" "$dir"
    fi
    log "starting ${services[*]} in $dir"

    # Kafka is by far the slowest (JVM, quorum election), so it starts in the background
    # while the others start one after another.
    local kafka_pid=""
    if has_service kafka "${services[@]}"; then
        "$DEPLOY_LOCAL_DIR/kafka.sh" start "$dir" >"$dir/kafka.env" &
        kafka_pid=$!
    fi
    local failed=0
    : >"$dir/others.env"
    for s in alertmanager prometheus redis; do
        has_service "$s" "${services[@]}" || continue
        if [[ "$s" == prometheus && -s "$dir/alertmanager/port" ]]; then
            DRIFTLINE_STACK_ALERTMANAGER="127.0.0.1:$(cat "$dir/alertmanager/port")"
            export DRIFTLINE_STACK_ALERTMANAGER
        fi
        if ! "$DEPLOY_LOCAL_DIR/$s.sh" start "$dir" >>"$dir/others.env"; then
            failed=1
            break
        fi
    done
    if [[ -n "$kafka_pid" ]] && ! wait "$kafka_pid"; then
        failed=1
    fi
    if [[ $failed == 1 ]]; then
        cmd_stop "$dir" 1
        die "the stack did not start (state directory: $dir)"
    fi
    {
        echo "DRIFTLINE_STACK_DIR=$dir"
        [[ -f "$dir/kafka.env" ]] && cat "$dir/kafka.env"
        cat "$dir/others.env"
    } >"$dir/stack.env"
    rm -f "$dir/kafka.env" "$dir/others.env"
    log "stack ready in $((SECONDS - t0))s"
    cat "$dir/stack.env"
}

case "${1:-}" in
    start)
        shift
        cmd_start "$@"
        ;;
    stop)
        shift
        keep=0 dir_arg=""
        for a in "$@"; do
            if [[ "$a" == --keep ]]; then keep=1; else dir_arg="$a"; fi
        done
        cmd_stop "$(pick_dir "$dir_arg")" "$keep"
        ;;
    env)
        dir="$(pick_dir "${2:-}")"
        [[ -f "$dir/stack.env" ]] || die "no env file in $dir (is the stack started?)"
        cat "$dir/stack.env"
        ;;
    *)
        echo "usage: $0 start [kafka|redis|prometheus|alertmanager ...] | stop [STATE_DIR] [--keep] | env [STATE_DIR]" >&2
        exit 2
        ;;
esac
