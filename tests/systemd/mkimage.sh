#!/usr/bin/env bash
# Build (once) the Debian bookworm tree that the systemd tier boots with systemd-nspawn.
#
# Usage: tests/systemd/mkimage.sh [DEST]   (default: <repo>/build/images/bookworm)
#
# Idempotent: DEST/.powernode-image-stamp records the inputs (package list, mirror, this
# script's hash). If they match, nothing is done; otherwise the tree is rebuilt in a sibling
# directory and swapped in, so an interrupted build never leaves a half tree behind.
# Tests never modify DEST: each boot puts a throwaway overlayfs on top of it.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${1:-$REPO/build/images/bookworm}
SUITE=bookworm
# systemd + systemd-sysv: PID 1, busctl, systemd-analyze, sysusers, tmpfiles.
# dbus: the system bus the daemons register on.
# polkitd: systemd asks polkit whether a non-root caller (mountd, the agent's tasks; user powernode) may
# start and stop units; the project's rules in /usr/share/polkit-1/rules.d decide.
# ca-certificates: the OCI client (oci-client → reqwest) loads the system roots even for a
# plain-HTTP loopback registry, and panics when there are none.
# Nothing else: minbase already has util-linux (mount, losetup, setpriv, nsenter) and the tests
# need no network tools inside.
PACKAGES=systemd,systemd-sysv,dbus,ca-certificates
# Installed with apt after debootstrap: polkitd's maintainer scripts fail inside debootstrap's
# own configure pass (debootstrap reports "Failure while configuring base packages", naming
# polkitd); a plain apt-get install in the finished tree works.
LATE_PACKAGES="polkitd"

mirror() {
    # Same mirror the host uses (deb822 sources), else the Debian CDN.
    local f=/etc/apt/sources.list.d/debian.sources uri
    if [[ -r $f ]]; then
        uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$f")
        [[ -n $uri ]] && { echo "$uri"; return; }
    fi
    echo http://deb.debian.org/debian
}
MIRROR=$(mirror)
STAMP_WANT="suite=$SUITE packages=$PACKAGES late=$LATE_PACKAGES mirror=$MIRROR script=$(sha256sum "$0" | cut -d' ' -f1)"
STAMP=$DEST/.powernode-image-stamp

if [[ -f $STAMP && $(cat "$STAMP") == "$STAMP_WANT" ]]; then
    echo "mkimage: $DEST is up to date"
    exit 0
fi

for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null || { echo "mkimage: $tool missing (run: make deps)" >&2; exit 1; }
done

NEW=$DEST.new.$$
trap 'rm -rf --one-file-system "$NEW"' EXIT
mkdir -p "$(dirname "$DEST")"
start=$(date +%s)
echo "mkimage: debootstrap $SUITE ($PACKAGES) from $MIRROR into $DEST"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$NEW" "$MIRROR" >"$NEW.log" 2>&1 || {
    echo "mkimage: debootstrap failed; last lines of $NEW.log:" >&2; tail -30 "$NEW.log" >&2; exit 1; }
rm -f "$NEW.log"
# shellcheck disable=SC2086 # a word list
DEBIAN_FRONTEND=noninteractive chroot "$NEW" apt-get install -y -qq --no-install-recommends \
    $LATE_PACKAGES >"$NEW.log" 2>&1 || {
    echo "mkimage: installing $LATE_PACKAGES failed; last lines of $NEW.log:" >&2; tail -30 "$NEW.log" >&2; exit 1; }
rm -f "$NEW.log"

# Units that only slow a container boot down or wait for devices that never come.
for u in console-getty.service serial-getty@.service getty@.service container-getty@.service \
         getty.target apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
         fstrim.timer systemd-networkd-wait-online.service; do
    ln -sf /dev/null "$NEW/etc/systemd/system/$u"
done
echo pnimage >"$NEW/etc/hostname"
# An empty machine-id makes systemd generate a transient one per boot (every boot is fresh).
: >"$NEW/etc/machine-id"
# Nothing in the tests reads apt's lists or the package cache.
rm -rf "$NEW"/var/cache/apt/archives/*.deb "$NEW"/var/lib/apt/lists/*

echo "$STAMP_WANT" >"$NEW/.powernode-image-stamp"
rm -rf --one-file-system "$DEST"
mv "$NEW" "$DEST"
trap - EXIT
echo "mkimage: built $DEST in $(( $(date +%s) - start )) s ($(du -sh "$DEST" | cut -f1))"
