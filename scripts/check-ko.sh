#!/usr/bin/env bash
# Static checks of the built module: tools/kocheck (one PASS/FAIL line per rule, exit 1 on any
# FAIL) plus the readelf header and section summary, for a human to compare.
#
#   scripts/check-ko.sh [KO] [extra kocheck flags...]
#
# KO defaults to ./nvme_hotplug.ko; the KPI allowlist is target/kld/kpi-symbols.txt, written by
# the kld build (scripts/build-kld.sh) from the declarations bindgen generated (override: KPI=FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/host-cargo.sh

ko=nvme_hotplug.ko
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then ko=$1; shift; fi
kpi=${KPI:-target/kld/kpi-symbols.txt}

if [ ! -f "$ko" ]; then
    echo "FAIL check-ko: $ko not found (build it with \`make\`)" >&2
    exit 1
fi
if [ ! -f "$kpi" ]; then
    echo "FAIL check-ko: $kpi not found (written by scripts/build-kld.sh; run \`make\`)" >&2
    exit 1
fi

echo "-- readelf -h -S $ko"
readelf=$(command -v readelf || command -v llvm-readelf-19 || command -v llvm-readelf || true)
if [ -n "$readelf" ]; then
    "$readelf" -h "$ko" | grep -E 'Class|OS/ABI|Type|Machine'
    "$readelf" -S -W "$ko" | sed -n '/\[Nr\]/,/^Key/p' | grep -v '^Key'
else
    echo "   (no readelf: install binutils or llvm)"
fi

# What nvme_hotplug.ko must declare beyond kocheck's defaults (kernel 15.x, pci): the ACPI
# hotplug notify handlers (issue 4) need acpi(4) loaded first.
requires=(--also-depend acpi)

echo "-- kocheck $ko"
"$HOST_CARGO" run -q -p kocheck --release -- "$ko" --kpi "$kpi" "${requires[@]}" "$@"
