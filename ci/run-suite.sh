#!/usr/bin/env bash
# Plain entry for any runner: run the lab suite against HOST (default: local) and
# keep the run folders and JUnit in OUT. Exit code: pytest's (0 ok, 1 failures),
# or testbed's for the sweep (0 ok, 1 expectation violated, 2 config, 3 infra).
set -euo pipefail
HOST=${1:-local}
OUT=${2:-runs/ci}
mkdir -p "$OUT"
.venv/bin/testbed host check "$HOST"
.venv/bin/pytest suites/ --testbed-host "$HOST" --testbed-out "$OUT/suite" --junitxml "$OUT/junit.xml"
.venv/bin/testbed run playbooks/quick.yaml --host "$HOST" --out "$OUT/quick"
