#!/bin/sh
# Builds nvme_hotplug.ko at the repository root. POSIX sh: runs on Linux and FreeBSD.
#
# FreeBSD: `make -C kmod` (bsd.kmod.mk against SYSDIR, default /usr/src/sys), which runs cargo for
#          the Rust part and links it with the C glue like any kld.
# Linux:   cross-build for FreeBSD 15 amd64 (see kmod/README.md):
#          1. toolchain (Debian: scripts/bootstrap-debian.sh build; idempotent)
#          2. FreeBSD headers (scripts/freebsd-headers.sh; skipped when present)
#          3. Rust staticlib: cargo + build-std + fat LTO for kmod/x86_64-freebsd-kld.json,
#             bindgen over kmod/kpi.h in build.rs
#          4. C glue with clang, flags as kern.mk/kmod.mk would use
#          5. ld.lld -r with kmod/ldscript, all globals made local, debug/unwind/bitcode stripped
#          6. every undefined symbol must be a KPI name bindgen declared (target/kld/kpi-symbols.txt)
#
# Environment: NVMEHP_FBSD_INCLUDE (header root, default .cache/freebsd-include),
#              NVMEHP_SKIP_BOOTSTRAP=1 (do not run the Debian bootstrap).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
KO=nvme_hotplug.ko
say() { echo "build-kld: $*"; }
die() { echo "build-kld: error: $*" >&2; exit 1; }

if [ "$(uname -s)" = FreeBSD ]; then
    # Untested in this project's CI (no FreeBSD host): kmod/Makefile documents the requirements.
    SYSDIR=${SYSDIR:-/usr/src/sys}
    [ -f "$SYSDIR/sys/param.h" ] || die "no kernel sources in $SYSDIR: install them (e.g. git clone -b releng/15.0 https://git.freebsd.org/src.git /usr/src) or set SYSDIR"
    make -C kmod SYSDIR="$SYSDIR"
    objdir=$(make -C kmod -V .OBJDIR)
    cp "$objdir/$KO" "$root/$KO"
    say "built $root/$KO"
    exit 0
fi

start=$(date +%s)

# 1. Toolchain.
if [ "${NVMEHP_SKIP_BOOTSTRAP:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
    bash scripts/bootstrap-debian.sh build
fi
CARGO=/usr/bin/cargo RUSTC=/usr/bin/rustc
CC=clang-19 LD=ld.lld-19 NM=llvm-nm-19 OBJCOPY=llvm-objcopy-19
for t in $CARGO $RUSTC $CC $LD $NM $OBJCOPY; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found (Debian: scripts/bootstrap-debian.sh build)"
done
[ -d /usr/lib/rustlib/src/rust/library/core ] || die "rust library sources missing (Debian package rust-web-src)"

# 2. FreeBSD headers.
INC=${NVMEHP_FBSD_INCLUDE:-$root/.cache/freebsd-include}
export NVMEHP_FBSD_INCLUDE="$INC"
sh scripts/freebsd-headers.sh "$INC"

# 3. Rust staticlib. rustup's proxies come first in PATH and lack rust-src: use Debian's
#    rustc/cargo explicitly. RUSTC_BOOTSTRAP unlocks -Zbuild-std and the JSON target spec.
SPEC=kmod/x86_64-freebsd-kld.json
TRIPLE=x86_64-freebsd-kld
export CARGO_TARGET_DIR="$root/target/kld"
LIB=$CARGO_TARGET_DIR/$TRIPLE/kld/libnvme_hotplug.a
# "cold" = core/alloc/compiler_builtins and the build dependencies are compiled from scratch.
set -- "$CARGO_TARGET_DIR/$TRIPLE"/kld/deps/libcore-*.rlib
if [ -f "$1" ]; then kind=incremental; else kind=cold; fi
say "cargo: Rust staticlib for $SPEC ($kind build)"
RUSTC=$RUSTC RUSTC_BOOTSTRAP=1 "$CARGO" rustc -p nvme_hotplug --profile kld --features kld \
    --config 'profile.kld.package.compiler_builtins.codegen-units=10000' \
    -Zjson-target-spec -Zbuild-std=core,alloc --target "$SPEC" --crate-type staticlib
[ -f "$LIB" ] || die "cargo did not produce $LIB"

# The KPI list from build.rs (newest OUT_DIR wins if several exist).
KPI=$CARGO_TARGET_DIR/kpi-symbols.txt
kpi_src=$(ls -t "$CARGO_TARGET_DIR/$TRIPLE"/kld/build/nvme_hotplug-*/out/kpi-symbols.txt 2>/dev/null | head -n 1)
[ -n "$kpi_src" ] || die "build.rs did not write kpi-symbols.txt"
cp "$kpi_src" "$KPI"

# 4. C glue, with the flags kern.mk/kmod.mk use for amd64 modules.
OBJ=$CARGO_TARGET_DIR/obj
mkdir -p "$OBJ"
say "clang: kmod/nvme_hotplug_glue.c"
$CC -target x86_64-unknown-freebsd15.0 -O2 -pipe -nostdinc -ffreestanding -fwrapv \
    -fno-strict-aliasing -fno-common -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer \
    -mcmodel=kernel -mno-red-zone -mno-mmx -mno-sse -mno-aes -mno-avx -msoft-float \
    -fno-asynchronous-unwind-tables -fstack-protector -Wall -Werror \
    -D_KERNEL -DKLD_MODULE -D__FreeBSD_version=1500068 -D__SSP_FORTIFY_LEVEL=0 \
    -Ikmod -Ikmod/include -I"$INC/x86_64-freebsd-none" -I"$INC/generic-freebsd" \
    -include opt_global.h -c kmod/nvme_hotplug_glue.c -o "$OBJ/nvme_hotplug_glue.o"

# 5. Link like kmod.mk: relocatable, build-id, our section script; then EXPORT_SYMS=NO
#    (every defined global local) and strip what the kernel does not load.
say "ld.lld: $KO"
$LD -m elf_x86_64_fbsd -warn-common --build-id=sha1 -T kmod/ldscript -r \
    -o "$OBJ/$KO.full" "$OBJ/nvme_hotplug_glue.o" "$LIB"
$NM -g --defined-only --format=just-symbols "$OBJ/$KO.full" > "$OBJ/export.syms"
$OBJCOPY --localize-symbols="$OBJ/export.syms" --strip-debug \
    --remove-section=.eh_frame --remove-section=.rela.eh_frame \
    --remove-section=.llvmbc --remove-section=.llvmcmd --remove-section=.llvm_addrsig \
    --remove-section=.comment \
    "$OBJ/$KO.full" "$OBJ/$KO"

# 6. Imports: only KPI declared by the headers (weak __start_/__stop_set_* are the module's own
#    linker-set bounds, resolved by the kernel linker).
bad=$($NM -u "$OBJ/$KO" | awk '$1 == "U" { print $2 }' | while read -r s; do
    grep -qx "$s" "$KPI" || echo "$s"
done)
[ -z "$bad" ] || die "undefined symbols that are not declared KPI (see $KPI): $(echo $bad)"

cp "$OBJ/$KO" "$root/$KO"
end=$(date +%s)
text_hex=$(llvm-readelf-19 -S -W "$root/$KO" | sed -n 's/^ *\[ *[0-9]*\] \.text  *PROGBITS  *[0-9a-f]*  *[0-9a-f]*  *\([0-9a-f]*\) .*/\1/p')
text=$(printf '%d' "0x${text_hex:-0}")
size=$(wc -c < "$root/$KO" | tr -d ' ')
say "built $root/$KO"
say "figures: $kind build $((end - start)) s; $KO $size bytes, .text $text bytes; $(wc -l < "$KPI" | tr -d ' ') KPI symbols allowed ($KPI)"
