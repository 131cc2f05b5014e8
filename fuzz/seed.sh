#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ from the repository's fixtures (nothing binary is committed):
# the conformance bundles, the certificates, keys and RFC 3161 timestamps inside them, the
# upstream module manifests, and a few event-queue segments. Idempotent; run by `make fuzz`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec python3 - "$here" <<'PY'
import base64, glob, hashlib, json, os, struct, sys, zlib

fuzz = sys.argv[1]
fixtures = os.path.join(fuzz, "..", "tests", "fixtures")

def put(target, data):
    d = os.path.join(fuzz, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)

for path in sorted(glob.glob(os.path.join(fixtures, "sigstore", "bundle-verify", "*", "bundle.sigstore.json"))):
    raw = open(path, "rb").read()
    put("bundle", raw)
    try:
        b = json.loads(raw)
    except ValueError:
        continue
    vm = b.get("verificationMaterial", {})
    certs = [vm.get("certificate", {})] + vm.get("x509CertificateChain", {}).get("certificates", [])
    for c in certs:
        if "rawBytes" in c:
            put("x509_der", base64.b64decode(c["rawBytes"]))
    if "rawBytes" in vm.get("publicKey", {}):
        put("x509_der", base64.b64decode(vm["publicKey"]["rawBytes"]))
    sig = b.get("messageSignature", {}).get("signature")
    if sig is None:
        sigs = b.get("dsseEnvelope", {}).get("signatures", [])
        sig = sigs[0]["sig"] if sigs else None
    for ts in vm.get("timestampVerificationData", {}).get("rfc3161Timestamps", []):
        der = base64.b64decode(ts["signedTimestamp"])
        put("x509_der", der)
        if sig is not None:
            s = base64.b64decode(sig)
            put("rfc3161", struct.pack(">H", len(s)) + s + der)

for path in sorted(glob.glob(os.path.join(fixtures, "sigstore", "**", "trusted_root.json"), recursive=True)):
    root = json.load(open(path))
    for ca in root.get("certificateAuthorities", []) + root.get("timestampAuthorities", []):
        for c in ca.get("certChain", {}).get("certificates", []):
            put("x509_der", base64.b64decode(c["rawBytes"]))

for path in sorted(glob.glob(os.path.join(fixtures, "upstream-modules", "**", "manifest.yaml"), recursive=True)):
    put("manifest", open(path, "rb").read())

def record(seq, body):
    crc = zlib.crc32(struct.pack("<Q", seq) + body) & 0xFFFFFFFF
    return b"PNEv" + struct.pack("<II", len(body), crc) + struct.pack("<Q", seq) + body

events = [
    b'{"kind":"module.attached","severity":"info","payload":{"name":"redis"}}',
    b'{"kind":"system.cert.rotated","severity":"critical"}',
    b'{"kind":"x","payload":{"a":[1,2,{"b":null}]}}',
]
seg = b"".join(record(i + 1, e) for i, e in enumerate(events))
put("event_record", seg)
put("event_record", seg[:-7])  # torn tail
put("event_record", seg[:30] + b"garbage" + seg[30:])  # damage in the middle
for e in events:
    put("event_record", e)
PY
