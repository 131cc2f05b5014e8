#!/usr/bin/env bash
# Fetch (once) Debian's current amd64 kernel for the VM tier: the package linux-image-amd64
# depends on, unpacked under DEST (default <repo>/build/vm/kernel), with modules.dep built.
# Idempotent: a stamp records the package; a different package rebuilds the tree.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${1:-$REPO/build/vm/kernel}
PKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[[ -n $PKG ]] || { echo "kernel.sh: linux-image-amd64 has no kernel dependency (apt-get update?)" >&2; exit 1; }
if [[ -f $DEST/.stamp && $(cat "$DEST/.stamp") == "$PKG" ]]; then exit 0; fi
TMP=$(mktemp -d "${DEST%/*}.tmp.XXXX" 2>/dev/null || { mkdir -p "${DEST%/*}"; mktemp -d "${DEST%/*}.tmp.XXXX"; })
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && apt-get download -q -o APT::Sandbox::User=root "$PKG" >/dev/null)
dpkg-deb -x "$TMP"/"$PKG"_*.deb "$TMP/root"
KV=$(ls "$TMP/root/lib/modules")
depmod -b "$TMP/root" "$KV"
echo "$PKG" > "$TMP/root/.stamp"
rm -rf "$DEST"
mkdir -p "${DEST%/*}"
mv "$TMP/root" "$DEST"
echo "kernel.sh: $PKG ($KV) in $DEST"
