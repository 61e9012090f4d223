# shellcheck shell=bash
# Shared helpers for the deploy/local service scripts. Source it; do not run it.
#
# Conventions every service script follows:
#   SCRIPT start|stop|kill|restart|status [STATE_DIR]
#   - STATE_DIR defaults to $DRIFTLINE_STACK_DIR, else a new temp directory.
#   - The service lives in STATE_DIR/<service>/ (config, data, log, pid, port).
#   - `start` prints KEY=VALUE lines (the service's address and version) on stdout and
#     human progress on stderr, so callers can parse stdout as an env file.
#   - `start` on a directory that already holds a port file reuses port and data, which is
#     what `restart` relies on: clients keep their address across a restart.

set -euo pipefail

# shellcheck disable=SC2034 # used by the scripts that source this file
DEPLOY_LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DRIFTLINE_CACHE_DIR="${DRIFTLINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/driftline}"

log() { printf '[driftline-local] %s\n' "$*" >&2; }

die() {
    log "ERROR: $*"
    exit 1
}

# Print the last lines of a log file to stderr, for failure messages.
show_log_tail() {
    local file="$1" lines="${2:-40}"
    if [[ -s "$file" ]]; then
        log "last $lines lines of $file:"
        tail -n "$lines" "$file" | sed 's/^/    /' >&2
    else
        log "(log file $file is empty or missing)"
    fi
}

python_bin() {
    if [[ -n "${DRIFTLINE_PYTHON:-}" ]]; then
        echo "$DRIFTLINE_PYTHON"
    elif [[ -x /usr/bin/python3 ]]; then
        echo /usr/bin/python3
    else
        command -v python3 || die "python3 is needed to pick free ports"
    fi
}

# A port on 127.0.0.1 that nothing listens on right now (the kernel picks it).
free_port() {
    "$(python_bin)" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# http_ok URL: true when URL answers 2xx within 2 s.
http_ok() {
    if command -v curl >/dev/null; then
        curl -fsS -o /dev/null --max-time 2 "$1"
    else
        "$(python_bin)" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1"
    fi
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# resolve_state_dir [DIR]: echo the stack's state directory, creating it if needed.
resolve_state_dir() {
    local dir="${1:-${DRIFTLINE_STACK_DIR:-}}"
    if [[ -z "$dir" ]]; then
        dir="$(mktemp -d "${TMPDIR:-/tmp}/driftline-stack.XXXXXX")"
    fi
    mkdir -p "$dir"
    (cd "$dir" && pwd)
}

# proc_alive PID: running and not a zombie. Our services are orphans once their launcher
# exits, and whatever reaps orphans here may take a second or two: a zombie counts as gone.
proc_alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [[ -n "$state" && "$state" != Z ]]
}

pid_alive() {
    local pidfile="$1"
    [[ -s "$pidfile" ]] && proc_alive "$(cat "$pidfile")"
}

# wait_until TIMEOUT_S DESCRIPTION PIDFILE LOGFILE CMD...: poll CMD every 0.2 s until it
# succeeds; fail early if the process behind PIDFILE died, and show its log on failure.
wait_until() {
    local timeout="$1" what="$2" pidfile="$3" logfile="$4"
    shift 4
    local deadline=$((SECONDS + timeout))
    while ! "$@" >/dev/null 2>&1; do
        if [[ -n "$pidfile" ]] && ! pid_alive "$pidfile"; then
            show_log_tail "$logfile"
            die "$what: the process exited before it answered"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail "$logfile"
            die "$what: no answer within ${timeout}s"
        fi
        sleep 0.2
    done
}

# stop_pid PIDFILE GRACE_S [SIGNAL]: send SIGNAL (TERM), wait up to GRACE_S, then KILL.
stop_pid() {
    local pidfile="$1" grace="$2" sig="${3:-TERM}"
    if ! pid_alive "$pidfile"; then
        rm -f "$pidfile"
        return 0
    fi
    local pid
    pid="$(cat "$pidfile")"
    kill "-$sig" "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while proc_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            log "pid $pid did not stop within ${grace}s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
    rm -f "$pidfile"
}

# Run a command detached from our stdout (so callers reading it don't wait on the service),
# in its own session, and record its pid.
spawn() {
    local pidfile="$1" logfile="$2"
    shift 2
    setsid "$@" </dev/null >>"$logfile" 2>&1 &
    echo $! >"$pidfile"
}

# start_service DIR NAME TIMEOUT_S LOGFILE LAUNCH_FN READY_FN
# Start a single-port service kept in DIR (pid, port). LAUNCH_FN PORT spawns it (pidfile
# DIR/pid, output appended to LOGFILE); READY_FN PORT succeeds once it answers. A port taken
# between picking and binding is retried with a new port, or with the same one (after a
# pause) when DIR already had a port: a restart keeps its address.
start_service() {
    local dir="$1" name="$2" timeout="$3" logfile="$4" launch="$5" ready="$6"
    local reuse=0 attempt port offset started=$SECONDS
    [[ -s "$dir/port" ]] && reuse=1
    for attempt in 1 2 3; do
        [[ $reuse == 1 ]] || free_port >"$dir/port"
        port="$(cat "$dir/port")"
        offset=$(($(stat -c %s "$logfile" 2>/dev/null || echo 0) + 1))
        "$launch" "$port"
        local deadline=$((SECONDS + timeout)) died=0
        until "$ready" "$port" >/dev/null 2>&1; do
            if ! pid_alive "$dir/pid"; then
                died=1
                break
            fi
            if ((SECONDS >= deadline)); then
                show_log_tail "$logfile"
                stop_pid "$dir/pid" 5 KILL
                die "$name did not answer within ${timeout}s"
            fi
            sleep 0.1
        done
        if [[ $died == 0 ]]; then
            log "$name ready at 127.0.0.1:$port in $((SECONDS - started))s"
            return 0
        fi
        if ! tail -c "+$offset" "$logfile" | grep -qi "address already in use"; then
            show_log_tail "$logfile"
            die "$name exited during startup"
        fi
        log "$name: port $port busy (attempt $attempt)"
        [[ $reuse == 1 ]] && sleep 2
    done
    show_log_tail "$logfile"
    die "$name could not bind a port after 3 attempts"
}

# apt_install PKG...: install Debian packages without letting their init scripts start
# daemons (there is no systemd here; the scripts run the binaries themselves).
apt_install() {
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || die "need root (or sudo) to apt-get install $*"
        sudo=(sudo)
    fi
    local created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    log "apt-get install $*"
    local rc=0
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 \
        install -y -q --no-install-recommends "$@" >&2 || rc=$?
    if [[ $rc != 0 ]]; then
        log "apt-get install failed; refreshing package lists and retrying once"
        "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q >&2 || true
        rc=0
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 \
            install -y -q --no-install-recommends "$@" >&2 || rc=$?
    fi
    if [[ $created_policy == 1 ]]; then
        "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
    fi
    return $rc
}

# The Debian packages may have started a daemon anyway on a machine with an init system;
# we never rely on those, and ours bind only to loopback on free ports, so they can coexist.

# --- the command line every service script shares -----------------------------------------
# Stop a service this stack started (a no-op when EXTERNAL_VAR points at a running one).
#   service_stop NAME EXTERNAL_VAR [STATE_DIR] [SIGNAL]     (uses the script's STOP_GRACE)
service_stop() {
    local name=$1 var=$2 dir="${3:-${DRIFTLINE_STACK_DIR:-}}"
    [[ -n "${!var:-}" ]] && return 0
    [[ -n "$dir" ]] || die "usage: $name.sh stop STATE_DIR"
    stop_pid "$dir/$name/pid" "$STOP_GRACE" "${4:-TERM}"
}

# start|stop|kill|restart|status [STATE_DIR], plus one script-specific command.
#   service_main NAME EXTERNAL_VAR READY_FN EXTRA_CMD EXTRA_FN "$@"
# The script defines cmd_start; READY_FN gets the service's port (for status).
service_main() {
    local name=$1 var=$2 ready_fn=$3 extra=$4 extra_fn=$5
    shift 5
    case "${1:-}" in
        start) cmd_start "${2:-}" ;;
        stop) service_stop "$name" "$var" "${2:-}" ;;
        kill) service_stop "$name" "$var" "${2:-}" KILL ;;
        restart)
            service_stop "$name" "$var" "${2:-}"
            cmd_start "${2:-}"
            ;;
        status)
            local dir="${2:-${DRIFTLINE_STACK_DIR:-}}/$name"
            pid_alive "$dir/pid" && "$ready_fn" "$(cat "$dir/port")"
            ;;
        "$extra") "$extra_fn" ;;
        *)
            echo "usage: $name.sh start|stop|kill|restart|status [STATE_DIR] | $extra" >&2
            exit 2
            ;;
    esac
}
