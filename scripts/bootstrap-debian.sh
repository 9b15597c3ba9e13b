#!/usr/bin/env bash
# Installs what `make` and `make test` need on a fresh Debian 12 (bookworm) machine.
# Idempotent: every step checks first and says what it installs. Needs root (or sudo).
#
#   scripts/bootstrap-debian.sh build   # kld cross-build toolchain
#   scripts/bootstrap-debian.sh lab     # QEMU for the lab tests
#   scripts/bootstrap-debian.sh bench   # valgrind, for the benchmarks' instruction counts
set -euo pipefail

want=${1:-build}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
APT_TMP=$(mktemp -d)
trap 'rm -rf "$APT_TMP"' EXIT
apt_get() { $SUDO env TMPDIR="$APT_TMP" apt-get -y -q -o DPkg::Lock::Timeout=600 "$@"; }
missing() { local p out=(); for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || out+=("$p"); done; echo "${out[@]:-}"; }

if ! command -v apt-get >/dev/null; then
    echo "bootstrap: not a Debian-like system; install the packages listed in README.md by hand" >&2
    exit 1
fi

# The backports suite is added by deriving the mirror from the machine's own Debian source entry,
# so no host name is written anywhere by this project.
add_backports() {
    local list=/etc/apt/sources.list.d/nvmehp-bookworm-backports.sources uri=""
    [ -f "$list" ] && return 0
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null; then return 0; fi
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/{u=$2} /^Suites:/ && / bookworm( |$)/{print u; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    fi
    if [ -z "$uri" ]; then
        echo "bootstrap: cannot find this machine's Debian bookworm mirror to derive bookworm-backports" >&2
        exit 1
    fi
    echo "bootstrap: adding bookworm-backports from this machine's mirror ($list)"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" | $SUDO tee "$list" >/dev/null
    apt_get update
}

updated=0
apt_update_once() { [ $updated -eq 1 ] || { apt_get update; updated=1; }; }

# Only Debian 12 (bookworm) is verified: it is where rustc-web 1.96 and rust-web-src (matching
# library sources for -Zbuild-std) and QEMU 10 from bookworm-backports come from.
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-unknown}")

case "$want" in
build)
    pkgs=$(missing rustc-web cargo-web rust-web-src clang-19 lld-19 llvm-19 libclang-19-dev)
    # scripts/freebsd-headers.sh fetches the FreeBSD headers with `python3 -m pip download`.
    if ! python3 -m pip --version >/dev/null 2>&1; then
        extra=$(missing python3 python3-pip)
        pkgs="$pkgs${extra:+ $extra}"
    fi
    if [ -n "$pkgs" ]; then
        echo "bootstrap: installing Debian packages: $pkgs"
        apt_update_once
        if ! apt_get install --no-install-recommends $pkgs; then
            echo "bootstrap: could not install: $pkgs (this is $codename; verified on Debian 12 bookworm only)." >&2
            echo "bootstrap: the kld needs rustc+cargo 1.96 with matching rust-src, clang/lld/llvm >= 17, libclang, python3-pip." >&2
            exit 1
        fi
    fi
    ;;
lab)
    if ! command -v qemu-system-x86_64 >/dev/null; then
        if [ "$codename" = bookworm ]; then
            # bookworm's own qemu-system 7.2 conflicts with the qemu-utils 10 some images carry.
            add_backports
            apt_update_once
            echo "bootstrap: installing qemu-system-x86 from bookworm-backports"
            apt_get install --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-system-data ipxe-qemu seabios
        else
            apt_update_once
            echo "bootstrap: installing qemu-system-x86 ($codename; the lab is verified with QEMU 10.0 on bookworm)"
            apt_get install --no-install-recommends qemu-system-x86 qemu-system-data ipxe-qemu seabios
        fi
    fi
    ;;
bench)
    pkgs=$(missing valgrind)
    if [ -n "$pkgs" ]; then
        echo "bootstrap: installing Debian packages: $pkgs"
        apt_update_once
        apt_get install --no-install-recommends $pkgs
    fi
    ;;
*) echo "usage: $0 build|lab|bench" >&2; exit 2 ;;
esac
