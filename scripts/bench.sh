#!/usr/bin/env bash
# `make bench`: prints figures, asserts nothing.
#   - engine: cost of a 4 KiB I/O round trip through the NVMe engine against the software
#     controller (softnvme), beside a bare-ring baseline in the same run, and their ratio;
#   - teardown time after surprise removal with 1, 64 and 1,024 commands outstanding;
#   - lab: hotplug cycles per second against QEMU's real NVMe + ACPI hotplug models.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/host-cargo.sh
if [ "$(uname -s)" = Linux ]; then bash scripts/bootstrap-debian.sh lab; bash scripts/bootstrap-debian.sh bench; fi
for pkg in softnvme kpimodel nvmehp-lab; do
    echo "== cargo bench -p $pkg"
    "$HOST_CARGO" bench -p "$pkg"
done
