#!/usr/bin/env bash
# Rebuild the C++ extension in place (incremental, via ninja) after editing csrc/.
# A lock serializes builds when several shells build at once.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/minigpt-build.lock python setup.py -q build_ext --inplace "$@"
