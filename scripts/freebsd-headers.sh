#!/bin/sh
# Fetches the FreeBSD 15 headers (with their _KERNEL parts) that a Linux cross-build of the kld
# compiles against. FreeBSD does not publish them as a package usable on Linux, but the `ziglang`
# wheel on PyPI ships them (zig cross-compiles to FreeBSD): we download that one wheel with pip
# and extract only the two FreeBSD include trees from it (about 14 MB of a ~100 MB wheel; the
# wheel is deleted afterwards).
#
#   scripts/freebsd-headers.sh [DEST]     default DEST: $NVMEHP_FBSD_INCLUDE or .cache/freebsd-include
#
# Idempotent: does nothing when DEST already holds both trees. On FreeBSD this is not needed:
# build.rs uses SYSDIR (default /usr/src/sys) there.
set -eu

ZIG_VERSION=0.17.1
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-${NVMEHP_FBSD_INCLUDE:-$root/.cache/freebsd-include}}
wheels=$root/.cache/wheels

if [ -f "$dest/generic-freebsd/sys/bus.h" ] && [ -f "$dest/x86_64-freebsd-none/machine/param.h" ]; then
    echo "freebsd-headers: present in $dest"
    exit 0
fi

PY=${PYTHON:-python3}
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "freebsd-headers: '$PY -m pip' is not available; install python3-pip (Debian) and retry" >&2
    exit 1
fi

mkdir -p "$wheels"
set -- "$wheels"/ziglang-"$ZIG_VERSION"-*.whl
if [ ! -f "$1" ]; then
    echo "freebsd-headers: downloading the ziglang==$ZIG_VERSION wheel from PyPI into $wheels (for its FreeBSD headers only)"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" "ziglang==$ZIG_VERSION"
    set -- "$wheels"/ziglang-"$ZIG_VERSION"-*.whl
fi
[ -f "$1" ] || { echo "freebsd-headers: pip did not leave a ziglang wheel in $wheels" >&2; exit 1; }

echo "freebsd-headers: extracting generic-freebsd and x86_64-freebsd-none from $(basename "$1") into $dest"
tmp="$dest.tmp.$$"
rm -rf "$tmp"
"$PY" - "$1" "$tmp" <<'PYEOF'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
prefix = "ziglang/lib/libc/include/"
keep = ("generic-freebsd/", "x86_64-freebsd-none/")
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel.startswith(keep) or ".." in rel.split("/"):
            continue
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with z.open(info) as src, open(path, "wb") as dst:
            dst.write(src.read())
        n += 1
if n == 0:
    sys.exit("no FreeBSD headers found in " + wheel)
print("freebsd-headers: %d files extracted" % n)
PYEOF
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
rm -f "$1"
