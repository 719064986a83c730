#!/usr/bin/env bash
# Put an older revision under build/ (git-ignored), for a device call to time against the
# working tree (bench/device_session.sh):
#   bash bench/base.sh [REV]         its csrc/ as build/base/csrc (the build "base": its
#                                    kernels under the working tree's Python); carry build/base
#   bash bench/base.sh --full [REV]  the whole tree as build/base-full (its own Python, its
#                                    own kernels: the phase "abbase"); carry build/base-full
# REV defaults to HEAD.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --full ]; then
  rev=${2:-HEAD}
  rm -rf build/base-full && mkdir -p build/base-full
  git archive "$rev" | tar -x -C build/base-full
  echo "build/base-full: the tree of $(git rev-parse --short "$rev")"
  exit 0
fi
rev=${1:-HEAD}
rm -rf build/base && mkdir -p build/base
git archive "$rev" csrc | tar -x -C build/base
echo "build/base/csrc: csrc of $(git rev-parse --short "$rev")"
