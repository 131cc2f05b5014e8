#!/bin/bash
# dracut module "powernode": the node's boot path in the initramfs (issue #7).
# `powernode-boot.service` runs `powernode-agent boot` (persist → identity → enroll → fetch +
# verify modules → overlay at /sysroot); systemd's initrd-switch-root.target then switches.
#
# Inputs (environment, so one build script serves packages, `make initramfs` and tests):
#   POWERNODE_AGENT      the multicall binary to install (default /usr/bin/powernode-agent)
#   POWERNODE_TRUST_DIR  trust roots copied to /etc/powernode/trust (default: that dir, if present)
#   POWERNODE_CONFIG     agent.toml copied to /etc/powernode/agent.toml (default: that file, if present)

# Opt-in only (255): a host's `dracut` never picks this module up by itself.
check() {
    require_binaries "${POWERNODE_AGENT:-/usr/bin/powernode-agent}" mount mkfs.ext4 modprobe || return 1
    return 255
}

depends() {
    # systemd-initrd: the initrd targets and initrd-switch-root; systemd-networkd: DHCP and
    # network-online.target for the platform and the registry; dracut-systemd: rd.emergency=.
    echo systemd systemd-initrd systemd-networkd dracut-systemd
    return 0
}

installkernel() {
    # fw-cfg carries the identity on QEMU; virtio for disks and NICs; ext4 for /persist;
    # erofs + loop for module images (no file-backed erofs before 6.12); overlay for /sysroot.
    instmods qemu_fw_cfg virtio_pci virtio_blk virtio_net virtio_rng ext4 erofs overlay loop
}

install() {
    local agent="${POWERNODE_AGENT:-/usr/bin/powernode-agent}"
    local trust="${POWERNODE_TRUST_DIR:-/etc/powernode/trust}"
    local config="${POWERNODE_CONFIG:-/etc/powernode/agent.toml}"

    inst_binary "$agent" /usr/bin/powernode-agent
    # One binary, every daemon name (services/agent/src/multicall.rs).
    local name
    inst_dir /usr/libexec/powernode
    for name in identityd enrolld certd fleeteventd; do
        ln_r /usr/bin/powernode-agent "/usr/libexec/powernode/powernode-$name"
    done

    inst_multiple mount umount mkfs.ext4 mke2fs losetup modprobe
    inst_multiple -o /etc/mke2fs.conf
    # The OCI client builds its TLS verifier from the system roots even before it knows whether
    # a registry speaks HTTPS: without a bundle it refuses to start (and registries off
    # loopback are HTTPS anyway). The platform itself is verified against the identity's CA only.
    inst_multiple -o /etc/ssl/certs/ca-certificates.crt

    inst_simple "$moddir/powernode-boot.service" "$systemdsystemunitdir/powernode-boot.service"
    inst_simple "$moddir/90-powernode-dhcp.network" "$systemdnetworkconfdir/90-powernode-dhcp.network"
    inst_simple "$moddir/wait-online-any.conf" \
        "$systemdsystemunitdir/systemd-networkd-wait-online.service.d/90-powernode.conf"
    $SYSTEMCTL -q --root "$initdir" enable powernode-boot.service

    # Trust roots (Sigstore trusted_root.json, module keys under modules/, the platform CA).
    if [[ -d $trust ]]; then
        local f
        while IFS= read -r -d '' f; do
            inst_simple "$f" "/etc/powernode/trust/${f#"$trust"/}"
        done < <(find "$trust" -type f -print0)
    fi
    [[ -f $config ]] && inst_simple "$config" /etc/powernode/agent.toml
    return 0
}
