# Entry points for developers and CI. `make test` is what .ci/run executes.
# Everything here runs as root on Debian 12 (see shared/harness.md).

SHELL := /bin/bash
CARGO ?= cargo
IMAGE_DIR := build/images/bookworm

# Host packages the build and the tests need:
#   debootstrap, systemd-container  the nspawn container tier (tests/systemd/mkimage.sh)
#   dbus                            dbus-daemon for the private bus in host tests
#   util-linux, passwd              setpriv/nsenter, groupadd
#   socat                           forwarding into guests and containers
#   pkg-config, libtss2-dev         building tss-esapi
#   qemu-system-x86, busybox-static, cpio, kmod, binutils, e2fsprogs  the TCG VM tier (tests/vm/;
#       debugfs edits a powered-off /persist disk)
#   docker-registry, erofs-utils, fsverity  module publishing and pulling (tests/integration/tests/modules.rs)
#   dracut-core, dracut-network, zstd  `make initramfs` and the VM boot test (initramfs/build.sh).
#       dracut-core has the `dracut` tool and does not conflict with initramfs-tools (the
#       `dracut` package does, and would replace it); dracut-network has the systemd-networkd module.
DEB_PACKAGES := debootstrap systemd-container dbus util-linux passwd socat pkg-config libtss2-dev ca-certificates \
	qemu-system-x86 busybox-static cpio kmod binutils e2fsprogs docker-registry erofs-utils fsverity \
	dracut-core dracut-network zstd

.PHONY: all deps build image vm-assets initramfs lint test vm-test demo bench clean-images fuzz

all: build

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -qx 'install ok installed' || echo "$$p"; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@$(CARGO) nextest --version >/dev/null 2>&1 || { echo "deps: installing cargo-nextest"; $(CARGO) install --locked cargo-nextest; }
	@$(CARGO) fmt --version >/dev/null && $(CARGO) clippy --version >/dev/null

build:
	$(CARGO) build --workspace --all-targets

image:
	bash tests/systemd/mkimage.sh $(IMAGE_DIR)

# Debian's kernel for the VM tier, unpacked once under build/vm/kernel.
vm-assets:
	bash tests/vm/kernel.sh

# The dracut initramfs (initramfs/modules.d/90powernode) for the kernel of `make vm-assets`,
# holding this tree's powernode-agent: build/vm/initramfs.img. Trust roots and agent.toml come
# from /etc/powernode on this host when present (POWERNODE_TRUST_DIR / POWERNODE_CONFIG override).
AGENT_BIN ?= $(or $(CARGO_TARGET_DIR),target)/debug/powernode-agent
initramfs: vm-assets
	$(CARGO) build -p powernode-agent
	bash initramfs/build.sh build/vm/kernel $(AGENT_BIN) build/vm/initramfs.img

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Steps run one after another even under `make -j`; nextest's summary is the last output.
test:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory build
	@$(MAKE) --no-print-directory image
	@$(MAKE) --no-print-directory vm-assets
	@$(MAKE) --no-print-directory lint
	$(CARGO) nextest run --workspace --no-fail-fast

# Only the VM tier (TCG): identity on real firmware, identityd under systemd, the dracut boot.
# `make test` runs these too.
vm-test:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory build
	@$(MAKE) --no-print-directory image
	@$(MAKE) --no-print-directory vm-assets
	$(CARGO) nextest run -p powernode-integration-tests --test vm_identity --test vm_systemd --test vm_boot

# One node's life on this machine: registry + development platform on loopback, signed modules
# published (system-base + the upstream fixtures), a TCG VM booting our initramfs into them, the
# fleet view live until Ctrl-C (DEMO_SECONDS=N stops after N s). See README.md.
demo:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory build
	@$(MAKE) --no-print-directory image
	@$(MAKE) --no-print-directory vm-assets
	$(CARGO) run -q -p powernode-integration-tests --bin powernode-demo

# Figures, not tests (CI does not run it): `BENCH <name> <value> <unit>` lines, `vs <tool> <value>`
# for a peer measured in the same run, `#` comments. See tests/bench/run.sh. `make bench
# SECTIONS="modules boot"` runs only those sections.
bench:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory image
	@$(MAKE) --no-print-directory vm-assets
	@CARGO="$(CARGO)" bash tests/bench/run.sh $(SECTIONS)

# cargo-fuzz targets (fuzz/, its own workspace): each runs FUZZ_SECONDS on a corpus seeded from
# the fixtures (fuzz/seed.sh); a crash stops the run and fails (the input is kept under
# fuzz/artifacts/<target>/). libFuzzer needs unstable rustc flags: nightly when rustup has it,
# else RUSTC_BOOTSTRAP=1 on the stable toolchain. CI does not run it.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= bundle x509_der rfc3161 manifest event_record
fuzz:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || { echo "fuzz: installing cargo-fuzz"; $(CARGO) install --locked cargo-fuzz; }
	bash fuzz/seed.sh
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

clean-images:
	rm -rf --one-file-system build/images
