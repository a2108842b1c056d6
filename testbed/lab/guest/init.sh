#!/bin/busybox sh
# PID 1 of the reference guest: mount, load the drivers in dependency order,
# start the paravisor image named on the kernel command line (tb.pv=...).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
for m in $(cat /lib/testbed/modules.order); do
  insmod /lib/testbed/modules/$m.ko 2>/dev/null || echo "TB init insmod-failed module=$m" >/dev/ttyS0
done
pv=v2; shutdown_ms=100
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    tb.pv=*) pv=${arg#tb.pv=} ;;
    tb.shutdown_ms=*) shutdown_ms=${arg#tb.shutdown_ms=} ;;
  esac
done
echo "TB init kernel=$(uname -r) pv=$pv" >/dev/ttyS0
/lib/testbed/images/$pv $shutdown_ms &
# Reap children forever; the VM ends by poweroff, panic or the host.
while true; do wait; sleep 1; done
