#!/bin/sh
# /sbin/init of the VM boot test's module root: PID 1 after systemd's switch-root out of the
# dracut initramfs. Reports what the merged root looks like, then powers off.
export PATH=/bin
exec >/dev/console 2>&1
echo "PN-SYSROOT-INIT pid=$$"
echo "PN-CHECK layer=$(cat /etc/pn-layer)"
echo "PN-CHECK base_only=$(cat /etc/pn-base-only 2>/dev/null)"
echo "PN-CHECK app_only=$(cat /etc/pn-app-only 2>/dev/null)"
echo "PN-CHECK root_fstype=$(awk '$2=="/"{t=$3} END{print t}' /proc/mounts)"
echo "PN-CHECK persist_fstype=$(awk '$2=="/persist"{t=$3} END{print t}' /proc/mounts)"
echo "PN-CHECK lowers=$(awk '$2 ~ /^\/run\/powernode\/sysroot\/lower\//{print $3}' /proc/mounts | tr '\n' ' ')"
echo "PN-CHECK pki=$(ls /persist/var/lib/powernode/pki | tr '\n' ' ')"
if echo upper > /pn-upper-test 2>/dev/null; then echo "PN-CHECK writable=yes"; else echo "PN-CHECK writable=no"; fi
echo "PN-BOOTJSON $(cat /run/powernode/boot.json)"
echo "PN-SYSROOT-END"
sync
poweroff -f
