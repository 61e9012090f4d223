#!/usr/bin/env bash
# watchdog.sh OWNER_PID STATE_DIR: stop the stack in STATE_DIR once OWNER_PID has exited.
# stack.sh starts it when DRIFTLINE_STACK_OWNER_PID is set and stops it on `stack.sh stop`.
set -u
owner="$1" dir="$2"
# Polling every 2 s costs nothing and bounds how long orphans outlive a killed test run.
while kill -0 "$owner" 2>/dev/null; do
    sleep 2
done
rm -f "$dir/watchdog.pid"
exec "$(dirname "${BASH_SOURCE[0]}")/stack.sh" stop "$dir"
