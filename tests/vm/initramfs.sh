#!/usr/bin/env bash
# Build a small initramfs for the VM tier: busybox, the powernode-agent binary with its shared
# libraries, the kernel modules for fw-cfg, and INIT as /init.
# Usage: [MODULES="qemu_fw_cfg virtio_blk …"] initramfs.sh KERNEL_DIR AGENT_BINARY INIT OUT
# MODULES (default qemu_fw_cfg) are installed with their dependencies, in load order.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
KROOT=$1 AGENT=$2 INIT=$3 OUT=$4
KV=$(ls "$KROOT/lib/modules")
ST=$(mktemp -d); trap 'rm -rf "$ST"' EXIT
mkdir -p "$ST"/{bin,sbin,usr/bin,usr/lib,lib64,dev,proc,sys,run,tmp,etc/powernode,lib/modules}
cp /bin/busybox "$ST/bin/busybox"
for a in sh mount umount cat echo mkdir poweroff sleep insmod ls ip switch_root; do ln -sf busybox "$ST/bin/$a"; done
install -m755 "$AGENT" "$ST/usr/bin/powernode-agent"
# Debug builds carry hundreds of MB of DWARF: the initramfs only needs the code.
strip --strip-debug "$ST/usr/bin/powernode-agent"
# The binary's shared libraries (glibc, libgcc, tss2…), at the paths the loader expects.
ldd "$AGENT" | grep -o '/[^ ]*' | while read -r l; do install -D -m755 "$l" "$ST$l"; done
# The modules and what they depend on, in load order, each once.
touch "$ST/lib/modules/order"
for want in ${MODULES:-qemu_fw_cfg}; do
  modprobe -d "$KROOT" -S "$KV" --show-depends "$want" | awk '/^insmod/{print $2}' | while read -r m; do
    grep -qx "$(basename "$m")" "$ST/lib/modules/order" && continue
    install -D -m644 "$m" "$ST/lib/modules/$(basename "$m")"
    echo "$(basename "$m")" >> "$ST/lib/modules/order"
  done
done
install -m755 "$INIT" "$ST/init"
(cd "$ST" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT"
