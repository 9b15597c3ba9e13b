#!/usr/bin/env bash
# `make test`: every test of the project, in the order a failure is cheapest to read.
#   1. build nvme_hotplug.ko (installs the cross toolchain on Debian/Ubuntu if missing)
#   2. static checks of the .ko (scripts/check-ko.sh, tools/kocheck), and that no tracked file
#      cites a document outside the repository (scripts/check-self-contained.sh)
#   3. install QEMU for the lab if missing (scripts/bootstrap-debian.sh lab)
#   4. cargo test of the whole workspace: engine, hotplug logic, FreeBSD-rules model, .ko checker
#      negative tests, the .ko loaded by kldhost (FreeBSD's kernel linker in a Linux process),
#      and the QEMU lab (real QEMU NVMe + PIIX4 ACPI hotplug models)
#   5. the lab scenarios in scenarios/, each twice: driver engine (the lab's kernel around the
#      engine), then driver kld (the shipped .ko inside kldhost); each report must say ok = true.
#      A scenario kldhost cannot run yet (exit 77) is a SKIP, counted as skipped, never passed.
# The last line is the sum over all cargo test binaries: "tests: N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/host-cargo.sh

log=$(mktemp -d)/test.log
trap 'rm -rf "$(dirname "$log")"' EXIT

echo "== 1. build nvme_hotplug.ko"
sh scripts/build-kld.sh

# The .ko exists now: kldhost's tests (step 4) that load it fail instead of skipping without it.
export NVMEHP_REQUIRE_KO=1

echo "== 2. static checks of nvme_hotplug.ko"
bash scripts/check-ko.sh
bash scripts/check-self-contained.sh

echo "== 3. QEMU for the lab"
if [ "$(uname -s)" = Linux ]; then bash scripts/bootstrap-debian.sh lab; fi
# make test installs QEMU, so a lab test that cannot find it is a failure here, not a skip.
export NVMEHP_REQUIRE_QEMU=1

echo "== 4. cargo test --workspace"
status=0
"$HOST_CARGO" test --workspace --release 2>&1 | tee "$log" || status=$?
# The kernel layer's own unit tests (src/freebsd is compiled only with feature kld): on the host,
# bindgen'd from the headers step 1 fetched, the wrappers run against a recording fake kernel.
"$HOST_CARGO" test --release -p nvme_hotplug --features kld --lib freebsd:: 2>&1 | tee -a "$log" || status=$?

echo "== 5. lab scenarios (driver engine, then driver kld)"
scen_fail=0
scen_skip=0
if [ -d scenarios ]; then
    "$HOST_CARGO" build -q --release -p nvmehp-lab -p kldhost
    for s in scenarios/*.toml; do
        [ -e "$s" ] || continue
        base="target/scenario-$(basename "$s" .toml)"
        out="$base.json"
        if ./target/release/nvmehp-lab run "$s" --json "$out"; then
            echo "PASS scenario $s (engine) (report $out)"
        else
            echo "FAIL scenario $s (engine) (report $out)"; scen_fail=$((scen_fail + 1))
        fi
        out="$base-kld.json"
        rc=0
        kout=$(./target/release/nvmehp-lab run "$s" --driver kld --ko nvme_hotplug.ko --json "$out") || rc=$?
        [ "$rc" -eq 77 ] || printf '%s\n' "$kout"
        if [ "$rc" -eq 0 ]; then
            echo "PASS scenario $s (kld) (report $out)"
        elif [ "$rc" -eq 77 ]; then
            why=$(printf '%s\n' "$kout" | sed -n 's/^SKIP scenario [^:]*: //p' | head -n 1)
            echo "SKIP scenario $s (kld): $why"; scen_skip=$((scen_skip + 1))
        else
            echo "FAIL scenario $s (kld) (report $out)"; scen_fail=$((scen_fail + 1))
        fi
    done
fi

passed=$(awk '/^test result:/{for(i=1;i<=NF;i++) if($(i+1) ~ /^passed/) s+=$i} END{print s+0}' "$log")
failed=$(awk '/^test result:/{for(i=1;i<=NF;i++) if($(i+1) ~ /^failed/) s+=$i} END{print s+0}' "$log")
# A skipped test prints one line starting with SKIP and returns early, which libtest counts as
# passed: move it from "passed" to "skipped" so the summary does not claim it ran.
skipped=$(grep -c '^SKIP' "$log" || true)
passed=$((passed - skipped))
echo "scenarios: $scen_fail failed, $scen_skip skipped"
echo "tests: $passed passed, $((failed + scen_fail)) failed, $((skipped + scen_skip)) skipped"
[ "$status" -eq 0 ] && [ "$scen_fail" -eq 0 ]
