#!/usr/bin/env bash
# Regenerate the README's configuration table from driftline.config.Settings.
set -euo pipefail
cd "$(dirname "$0")/.."
table=$(.venv/bin/driftline config table)
python3 - "$table" <<'PY'
import sys
path = "README.md"
text = open(path).read()
start, end = "<!-- config-table:start -->", "<!-- config-table:end -->"
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
open(path, "w").write(f"{head}{start}\n{sys.argv[1]}\n{end}{tail}")
PY
