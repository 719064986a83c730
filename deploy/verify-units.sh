#!/usr/bin/env bash
# `systemd-analyze verify` of the units in deploy/. Works in a container without systemd as
# PID 1: it needs only the systemd package (installed here on Debian/Ubuntu if missing, as
# root). verify checks syntax, specifiers and that each ExecStart program exists, which is
# why the units start /usr/bin/env rather than a path under NANOPD_HOME. Any output fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "verify-units: installing systemd (for systemd-analyze)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            systemd >/dev/null
    else
        echo "verify-units: systemd-analyze is missing; install the systemd package" >&2
        exit 1
    fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp "$here"/nanopd-router.service "$here"/nanopd-gateway.service "$here"/nanopd.target \
   "$here"/nanopd-worker@.service "$tmp"/
cp "$here"/nanopd-worker@.service "$tmp"/nanopd-worker@colloc0.service  # an instance too

units=("$tmp"/*)
out="$(SYSTEMD_UNIT_PATH="$tmp:" systemd-analyze verify --man=no "${units[@]}" 2>&1)" || {
    printf '%s\n' "$out" >&2
    echo "verify-units: systemd-analyze verify failed" >&2
    exit 1
}
if [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    echo "verify-units: systemd-analyze verify had warnings" >&2
    exit 1
fi
echo "verify-units: ${#units[@]} units OK ($(systemd-analyze --version | head -1))"
