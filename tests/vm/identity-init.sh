#!/bin/sh
# /init of the VM identity test: load fw-cfg, run `powernode-agent introspect --json` against the
# real kernel interfaces (fw-cfg sysfs, SMBIOS, /proc/cmdline) and print it between markers.
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
# DMI counts as an identity only with a configured platform URL (see identity/dmi.rs).
printf '[platform]\nurl = "https://platform.example"\n' > /etc/powernode/agent.toml
echo "PN-INTROSPECT-BEGIN"
powernode-agent introspect --json
echo "PN-INTROSPECT-END rc=$?"
poweroff -f
