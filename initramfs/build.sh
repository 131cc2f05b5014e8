#!/usr/bin/env bash
# Build the powernode initramfs with Debian's dracut for an unpacked Debian kernel (the tree
# `make vm-assets` leaves in build/vm/kernel, shared/harness.md §1.1 and §7).
#
# Usage: initramfs/build.sh KERNEL_ROOT AGENT_BINARY OUT [extra dracut arguments…]
#   POWERNODE_TRUST_DIR / POWERNODE_CONFIG pass trust roots and agent.toml to the module
#   (initramfs/modules.d/90powernode/module-setup.sh).
#
# The repository's modules.d is laid over the system's dracut tree in a scratch copy made of
# symlinks, so nothing is installed on the host.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
[[ $# -ge 3 ]] || { echo "usage: $0 KERNEL_ROOT AGENT_BINARY OUT [dracut args…]" >&2; exit 2; }
KROOT=$(realpath "$1") AGENT=$(realpath "$2") OUT=$3
shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
command -v dracut >/dev/null || { echo "build.sh: dracut missing (apt package dracut-core; make deps)" >&2; exit 1; }
KV=$(ls "$KROOT/lib/modules")
[[ -n $KV && -d $KROOT/lib/modules/$KV ]] || { echo "build.sh: no kernel modules under $KROOT (make vm-assets)" >&2; exit 1; }

ST=$(mktemp -d); trap 'rm -rf "$ST"' EXIT
mkdir -p "$ST/dracut/modules.d" "$ST/conf.d" "$ST/bin"
for f in /usr/lib/dracut/*; do
  [[ $(basename "$f") == modules.d ]] || ln -s "$f" "$ST/dracut/$(basename "$f")"
done
for m in /usr/lib/dracut/modules.d/* "$HERE"/modules.d/*; do
  ln -sfn "$m" "$ST/dracut/modules.d/$(basename "$m")"
done
# Debug builds carry hundreds of MB of DWARF; the initramfs needs only the code.
strip --strip-debug -o "$ST/bin/powernode-agent" "$AGENT"

export dracutbasedir="$ST/dracut"
export POWERNODE_AGENT="$ST/bin/powernode-agent"
# Only what is asked for here: no host dracut.conf(.d), no host-only pruning. zstd -3, not
# dracut's default -15: a third of the build time for a few MB more, which the kernel
# unpacks just as fast.
dracut --quiet --force --no-hostonly --no-hostonly-cmdline --no-early-microcode \
  --conf /dev/null --confdir "$ST/conf.d" \
  --kver "$KV" --kmoddir "$KROOT/lib/modules/$KV" \
  --add "powernode" --omit "plymouth" --compress "zstd -q -3 -T0" \
  "$@" "$OUT"
echo "build.sh: $(du -h "$OUT" | cut -f1) initramfs for $KV in $OUT"
