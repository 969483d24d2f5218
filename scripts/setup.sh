#!/usr/bin/env bash
# Set up a development machine (Debian 12, run as root) and run the demo.
#
#   ./scripts/setup.sh            install what is missing, build .venv, run scripts/demo.sh
#   ./scripts/setup.sh --no-demo  the same without the demo
#
# Idempotent: Debian packages are checked with dpkg and installed only when missing
# (one `apt-get update` at most); the venv is rebuilt only when requirements.lock or
# pyproject.toml changed since the last successful run (stamp in .venv/).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN_DEMO=1
for arg in "$@"; do
    case "$arg" in
        --no-demo) RUN_DEMO=0 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg'" >&2; exit 2 ;;
    esac
done

log() { printf '==> %s\n' "$*"; }

# Tools this project and its tests use; later issues need most of them, one set-up for all.
DEB_PACKAGES=(
    python3 python3-venv python3-dev gcc git make attr acl
    restic borgbackup time
    qemu-system-x86 qemu-utils qemu-block-extra libnbd-bin nbdkit python3-libnbd
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
    busybox-static cpio e2fsprogs dosfstools mtools ntfs-3g xfsprogs fdisk debootstrap
    lvm2 btrfs-progs
    chromium chromium-driver
)

install_debian_packages() {
    local missing=() pkg
    for pkg in "${DEB_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "Debian packages: all ${#DEB_PACKAGES[@]} present"
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: missing Debian packages (${missing[*]}); run as root to install them" >&2
        exit 1
    fi
    log "Debian packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

pick_python() {
    # pyenv's python3 when PATH gives it, else Debian's.
    local py
    for py in "$(command -v python3 || true)" /usr/bin/python3; do
        if [ -n "$py" ] && "$py" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' \
            2>/dev/null; then
            echo "$py"
            return
        fi
    done
    echo "setup.sh: no usable python3 >= 3.11 with venv support" >&2
    exit 1
}

pip_quiet() {
    # This machine's pip configuration names local indexes that may be absent: drop that noise.
    .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

build_venv() {
    local stamp=.venv/.setup-stamp want py
    want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && .venv/bin/python -c 'import stratavault' 2>/dev/null; then
        log "venv: .venv is up to date"
        return
    fi
    if [ ! -x .venv/bin/python ]; then
        py=$(pick_python)
        log "venv: creating .venv with $py ($("$py" -V 2>&1))"
        "$py" -m venv .venv
    fi
    log "venv: installing requirements.lock (hash-checked)"
    pip_quiet install --require-hashes -r requirements.lock
    log "venv: installing the project (editable)"
    pip_quiet install --no-deps -e .
    echo "$want" >"$stamp"
}

install_debian_packages
build_venv
# Byte-compile the sources: where PYTHONDONTWRITEBYTECODE is set (it is on these machines),
# every command would otherwise compile its modules again (~0.1 s of each start-up).
.venv/bin/python -m compileall -q src/stratavault
log "set-up done in $ROOT ($(.venv/bin/python -V))"
if [ "$RUN_DEMO" -eq 1 ]; then
    log "running scripts/demo.sh"
    bash scripts/demo.sh
fi
