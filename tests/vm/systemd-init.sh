#!/bin/sh
# /init of the systemd VM tier: load the modules for fw-cfg, virtio disks and ext4, mount the
# root image (/dev/vda) and hand over to systemd as PID 1.
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || { echo "PN-INIT: cannot mount /dev/vda"; poweroff -f; }
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /lib/systemd/systemd
