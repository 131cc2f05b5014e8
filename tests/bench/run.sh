#!/usr/bin/env bash
# `make bench`: installs what the figures need, builds the binaries, copies them to a private
# directory (the target/ dir is shared) and runs powernode-bench. Figures only, never timed
# assertions. Runs as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARGO=${CARGO:-cargo}
# The dev profile: a release build (thin LTO, one codegen unit) takes too long on 2 cores.
# Dependencies are built at opt-level 1 (see [profile.dev.package."*"] in Cargo.toml).
PROFILE=dev
BIN_DIR=build/bench-bin
VENV=build/bench-venv

log() { echo "# bench: $*"; }

missing=$(for p in curl python3 python3-venv ca-certificates skopeo docker-registry erofs-utils fsverity; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -qx 'install ok installed' || echo "$p"
done)
if [ -n "$missing" ]; then
	log "installing" $missing
	apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
fi

# Peer verifier: sigstore-python in a private venv (offline verification needs nothing else).
if ! "$VENV/bin/python" -m sigstore --version >/dev/null 2>&1; then
	log "installing sigstore-python into $VENV"
	python3 -m venv "$VENV" >&2
	"$VENV/bin/pip" install -q --disable-pip-version-check sigstore >&2 ||
		log "pip install sigstore failed; the peer will be reported as missing"
fi

log "building (profile $PROFILE)"
$CARGO build -q -p powernode-agent -p powernode-devplatform -p powernode-fleeteventd >&2
$CARGO build -q -p powernode-integration-tests --bin powernode-bench >&2
target_dir=${CARGO_TARGET_DIR:-target}/debug
mkdir -p "$BIN_DIR"
for b in powernode-agent powernode-devplatform powernode-fleeteventd powernode-bench; do
	cp -f "$target_dir/$b" "$BIN_DIR/$b.tmp" && mv -f "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
done

export POWERNODE_BIN_DIR=$PWD/$BIN_DIR
export POWERNODE_BENCH_PROFILE=$PROFILE
if "$VENV/bin/python" -m sigstore --version >/dev/null 2>&1; then
	export POWERNODE_BENCH_PYTHON=$PWD/$VENV/bin/python
fi
unset POWERNODE_METADATA_URL
exec "$BIN_DIR/powernode-bench" "$@"
