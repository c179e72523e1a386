#!/usr/bin/env bash
# Checks systemd/mbt-edge.service the way CI gates it:
#   1. `systemd-analyze verify` prints nothing (any warning fails, not only errors);
#   2. `systemd-analyze security --offline=true` rates its exposure 2.0 or lower.
# Needs systemd-analyze (package systemd); systemd need not be running (containers are fine).
#
# verify checks that ExecStart's binary exists, and CI has no /usr/bin/mbt-edge. Rather than
# install one (root, and a stale binary could hide a real problem), it verifies a copy of
# the unit whose ExecStart names a stub executable in a temporary directory; every other line
# is verified as shipped. The script fails if that rewrite stops matching ExecStart.
set -euo pipefail
cd "$(dirname "$0")/.."

unit=systemd/mbt-edge.service
# systemd-analyze's threshold is in tenths: 20 means exposure 2.0.
max_exposure_tenths="${MAX_EXPOSURE_TENTHS:-20}"

if ! command -v systemd-analyze >/dev/null; then
    echo "check-unit: systemd-analyze is missing (apt-get install systemd)" >&2
    exit 1
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

printf '#!/bin/sh\nexit 0\n' > "$scratch/mbt-edge"
chmod 755 "$scratch/mbt-edge"
sed "s|^ExecStart=/usr/bin/mbt-edge |ExecStart=$scratch/mbt-edge |" "$unit" > "$scratch/mbt-edge.service"
if [ "$(diff "$unit" "$scratch/mbt-edge.service" | grep -c '^>')" != 1 ]; then
    echo "check-unit: expected exactly one 'ExecStart=/usr/bin/mbt-edge ...' line in $unit" >&2
    exit 1
fi

status=0
echo "check-unit: systemd-analyze verify $unit"
if ! verify_output=$(systemd-analyze verify "$scratch/mbt-edge.service" 2>&1) || [ -n "$verify_output" ]; then
    printf '%s\n' "${verify_output//$scratch\/mbt-edge.service/$unit}" >&2
    echo "check-unit: verify is not clean" >&2
    status=1
else
    echo "check-unit: verify clean"
fi

echo "check-unit: systemd-analyze security --offline=true --threshold=$max_exposure_tenths $unit"
security_status=0
security_output=$(systemd-analyze security --offline=true --threshold="$max_exposure_tenths" "$unit" 2>&1) \
    || security_status=$?
exposure_line=$(printf '%s\n' "$security_output" | grep 'Overall exposure level' || true)
if [ "$security_status" != 0 ] || [ -z "$exposure_line" ]; then
    # The table shows which settings cost exposure.
    printf '%s\n' "$security_output" | grep -E '^✗|Overall|Failed|rror' >&2 || printf '%s\n' "$security_output" >&2
    echo "check-unit: exposure above $((max_exposure_tenths / 10)).$((max_exposure_tenths % 10)) (or security failed)" >&2
    status=1
else
    echo "check-unit: ${exposure_line#→ }"
fi

exit "$status"
