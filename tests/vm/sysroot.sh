#!/usr/bin/env bash
# Build the root disk of the systemd VM tier: the debootstrapped Debian tree (make image), the
# installed suite (TREE, from units/ and the binaries), and the files in EXTRA layered on top,
# as an ext4 image.
# Usage: sysroot.sh IMAGE_DIR TREE EXTRA OUT
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
IMAGE=$1 TREE=$2 EXTRA=$3 OUT=$4
ST=$(mktemp -d "${OUT%/*}/sysroot.XXXX"); trap 'rm -rf --one-file-system "$ST"' EXIT
cp -a "$IMAGE/." "$ST/"
cp -a "$TREE/." "$ST/"
cp -a "$EXTRA/." "$ST/"
# Debug builds carry hundreds of MB of DWARF each; the guest needs only the code.
for b in "$ST"/usr/bin/powernode-* "$ST"/usr/libexec/powernode/*; do
  [[ -f $b && ! -L $b ]] && strip --strip-debug "$b"
done
# The suite's account, as the package's sysusers.d would create it at install (tmpfiles runs at boot).
systemd-sysusers --root="$ST" >/dev/null
mkfs.ext4 -q -F -L pnroot -d "$ST" "$OUT" 2G
