#!/bin/busybox sh
# Test-guest /init: mount the pseudo file systems, then run the workload named on the kernel
# command line (dwcp.dirty=RATE_MBPS,SIZE_MB; absent = idle) with its heartbeat on the console.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
rate=0
size=0
for arg in $(/bin/busybox cat /proc/cmdline); do
    case "$arg" in
        dwcp.dirty=*)
            spec="${arg#dwcp.dirty=}"
            rate="${spec%%,*}"
            size="${spec#*,}"
            ;;
    esac
done
exec /guestd "$rate" "$size" </dev/console >/dev/console 2>&1
