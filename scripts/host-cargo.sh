# Sourced by the test and bench scripts: picks the cargo that builds host code (the lab, the
# checker, unit tests). Any stable cargo >= 1.75 works; rustup's if present, else Debian's
# (installed by scripts/bootstrap-debian.sh build).
if command -v cargo >/dev/null 2>&1; then
    HOST_CARGO=$(command -v cargo)
elif [ -x /usr/bin/cargo ]; then
    HOST_CARGO=/usr/bin/cargo
else
    echo "no cargo found: run scripts/bootstrap-debian.sh build (Debian) or install rust (FreeBSD: pkg install rust)" >&2
    exit 1
fi
export HOST_CARGO
