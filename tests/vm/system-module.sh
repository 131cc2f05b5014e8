#!/usr/bin/env bash
# A `system-base`-style module tree for vm_boot.rs: the Debian tree of `make image`
# (tests/systemd/mkimage.sh) with the powernode suite installed the way a real system module
# carries it, booted by systemd after the initramfs's switch-root.
# Usage: system-module.sh IMAGE_DIR UNITS_DIR AGENT_BINARY DEST
set -euo pipefail
IMAGE=$1 UNITS=$2 AGENT=$3 DEST=$4
cp -a "$IMAGE" "$DEST"
# What a booted node never reads: keeps the image (and its TCG download + hashing) small.
rm -rf "$DEST"/usr/share/{doc,man,info,locale} "$DEST"/var/cache/apt/* "$DEST"/var/lib/apt/lists/*
cp -a "$UNITS"/. "$DEST"/
mkdir -p "$DEST/usr/bin" "$DEST/usr/libexec/powernode"
# Debug builds carry hundreds of MB of DWARF; one stripped multicall binary serves every daemon.
strip --strip-debug -o "$DEST/usr/bin/powernode-agent" "$AGENT"
for d in identityd enrolld certd fleeteventd mountd mount-helper; do
  ln -sf ../../bin/powernode-agent "$DEST/usr/libexec/powernode/powernode-$d"
done
S=$DEST/etc/systemd/system
mkdir -p "$S/multi-user.target.wants" "$S/sockets.target.wants" "$S/network-online.target.wants"
ln -sf /usr/lib/systemd/system/powernode-agent.service "$S/multi-user.target.wants/"
ln -sf /lib/systemd/system/systemd-networkd.service "$S/multi-user.target.wants/"
ln -sf /lib/systemd/system/systemd-networkd.socket "$S/sockets.target.wants/"
ln -sf /lib/systemd/system/systemd-networkd-wait-online.service "$S/network-online.target.wants/"
mkdir -p "$DEST/etc/systemd/network"
cat > "$DEST/etc/systemd/network/90-dhcp.network" <<'NET'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
IPv6AcceptRA=no
LinkLocalAddressing=no
NET
# The initramfs wrote the PKI as root; the daemons run as `powernode`, whose uid this root's
# sysusers decides at boot. Hand the state over (units/ should ship this; see issue #7).
mkdir -p "$DEST/etc/tmpfiles.d"
echo 'Z /persist/var/lib/powernode - powernode powernode -' > "$DEST/etc/tmpfiles.d/zz-powernode-persist.conf"
# Proof on the console that the module's own systemd runs units after the switch.
cat > "$S/pn-report.service" <<'UNIT'
[Unit]
Description=vm_boot report
After=local-fs.target systemd-tmpfiles-setup.service
Before=powernode-agent.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c '. /etc/os-release; echo "PN-SYSTEM os=$ID"; echo "PN-BOOTJSON $(cat /run/powernode/boot.json)"'
StandardOutput=tty
TTYPath=/dev/ttyS0
[Install]
WantedBy=multi-user.target
UNIT
ln -sf ../pn-report.service "$S/multi-user.target.wants/pn-report.service"
# If the agent has not reported within a while, its state on the console (the test's
# failure message shows it).
cat > "$S/pn-diag.service" <<'UNIT'
[Unit]
Description=vm_boot diagnostics
After=powernode-agent.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'sleep 25; systemctl --no-pager status powernode-agent.service; journalctl --no-pager -b -n 40 -u powernode-agent.service -u powernode-enrolld.service; networkctl --no-pager; systemctl --no-pager status systemd-networkd.service; ls -ldn /persist/var /persist/var/lib /persist/var/lib/powernode /persist/var/lib/powernode/pki'
StandardOutput=tty
TTYPath=/dev/ttyS0
UNIT
ln -sf ../pn-diag.service "$S/multi-user.target.wants/pn-diag.service"
