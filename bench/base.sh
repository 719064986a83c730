#!/usr/bin/env bash
# Put an older revision's csrc/ under build/base/ (git-ignored), for a device call to build
# and time against the working tree's kernels (device_session.sh's build "base"):
#   bash bench/base.sh [REV]     (default HEAD), then carry build/base
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-HEAD}
rm -rf build/base && mkdir -p build/base
git archive "$rev" csrc | tar -x -C build/base
echo "build/base/csrc: csrc of $(git rev-parse --short "$rev")"
