"""The scripts that run inside the test guest: the initramfs /init, the root filesystem's
/sbin/init, and small helpers. Kept apart from the build so that they read as shell.
"""

from __future__ import annotations

INIT_MARKER = "stratavault-guest: init started"
READY_MARKER = "stratavault-guest: ready"
ROOT_FAILED_MARKER = "stratavault-initramfs: cannot mount root"

# Runs from the initramfs as PID 1: load the modules (listed in /modules.order, dependencies
# first), mount the root filesystem and switch_root into it. Powers off when the root cannot be
# mounted, so that an unbootable disk ends the VM instead of hanging it.
INITRAMFS_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /modules.order); do
    insmod /lib/modules/$m.ko || echo "stratavault-initramfs: insmod $m failed"
done
root=/dev/vda1
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root="${{arg#root=}}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "{ROOT_FAILED_MARKER} $root"
    sync
    poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
echo "{ROOT_FAILED_MARKER}: switch_root failed"
poweroff -f
"""

# PID 1 of the root filesystem. Its first line is the marker that boot-time measurements wait
# for. Options on the kernel command line: sv.writer=1 starts the writer loop on /data,
# sv.writer_interval=SECONDS paces it (default 0.2).
ROOT_INIT = f"""#!/bin/sh
echo "{INIT_MARKER}"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] && ln -sf "../${{p##*/}}" "/dev/virtio-ports/$(cat "$p/name")"
done
hostname sv-guest
writer=0
interval=0.2
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        sv.writer=*) writer="${{arg#sv.writer=}}" ;;
        sv.writer_interval=*) interval="${{arg#sv.writer_interval=}}" ;;
    esac
done
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
(
    while :; do
        qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run \\
            -f /run/qemu-ga.pid
        sleep 1
    done
) </dev/null >/dev/null 2>&1 &
mkdir -p /data
for d in /dev/vdb1 /dev/vdb; do
    if [ -b $d ] && mount -t ext4 -o rw $d /data; then
        echo "stratavault-guest: data disk $d mounted on /data"
        break
    fi
done
echo "{READY_MARKER}"
if [ "$writer" = 1 ]; then
    sv-writer "$interval" </dev/null >/dev/null 2>&1 &
    echo "stratavault-guest: writer started"
fi
while :; do sleep 3600; done
"""

# The writer loop: rewrites /data/writer/file-N (N = counter mod 8, 64 KiB each, every line
# naming the counter) and /data/writer/counter, syncing after each round.
WRITER = """#!/bin/sh
interval=${1:-0.2}
mkdir -p /data/writer
n=0
while :; do
    n=$((n + 1))
    yes "stratavault-writer $n" | head -c 65536 > /data/writer/file-$((n % 8))
    echo $n > /data/writer/counter
    sync
    sleep "$interval"
done
"""

# sv-write PATH: stdin to PATH (parents made), then sync. For guest-exec with input-data.
WRITE_FILE = """#!/bin/sh
mkdir -p "$(dirname "$1")" && cat > "$1" && sync
"""

# qemu-ga's guest-shutdown runs /sbin/shutdown; busybox has none, PID 1 is a shell.
# Unmounting /data checkpoints its journal, so the disk reads clean without a replay.
SHUTDOWN = """#!/bin/sh
sync
umount /data 2>/dev/null
mount -o remount,ro / 2>/dev/null
case "$*" in *-r*) exec reboot -f ;; esac
exec poweroff -f
"""
