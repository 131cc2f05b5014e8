#!/usr/bin/env bash
# Test-only initramfs addition for vm_boot.rs: the platform names its registry as
# 127.0.0.1:PORT (loopback registries are plain HTTP), so inside the guest a socket-activated
# systemd-socket-proxyd relays 127.0.0.1:PORT to the host side of QEMU's guestfwd.
# Usage: registry-relay.sh STAGING_DIR PORT GUESTFWD_ADDR
set -euo pipefail
ST=$1 PORT=$2 TO=$3
U=$ST/etc/systemd/system
mkdir -p "$U/sockets.target.wants"
cat > "$U/pn-registry-relay.socket" <<UNIT
[Unit]
Description=Test registry relay on guest loopback
DefaultDependencies=no
Before=sockets.target
[Socket]
ListenStream=127.0.0.1:$PORT
UNIT
cat > "$U/pn-registry-relay.service" <<UNIT
[Unit]
Description=Test registry relay to $TO
DefaultDependencies=no
[Service]
ExecStart=/usr/lib/systemd/systemd-socket-proxyd $TO
UNIT
ln -sf ../pn-registry-relay.socket "$U/sockets.target.wants/pn-registry-relay.socket"
