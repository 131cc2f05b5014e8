//! RFC 3161 TimeStampResp / CMS SignedData: the strict structural parse, then the whole
//! timestamp check against the trust root of the Rekor v2 conformance bundles (its TSA).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use powernode::verify::{TrustedRoot, tsa};

/// The signature the conformance timestamps were issued over is not known to the fuzzer: the
/// imprint check fails for any other, so seeds carry it in front of the DER (first 2 bytes =
/// its length, then the signature, then the TimeStampResp). See fuzz/seed.sh.
fn split(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let n = usize::from(u16::from_be_bytes(*len));
    (rest.len() >= n).then(|| rest.split_at(n))
}

fn root() -> &'static TrustedRoot {
    static ROOT: OnceLock<TrustedRoot> = OnceLock::new();
    ROOT.get_or_init(|| {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/sigstore/bundle-verify/rekor2-happy-path/trusted_root.json"
        );
        TrustedRoot::from_json(&std::fs::read(p).expect("root")).expect("trusted root")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((signature, resp)) = split(data) else {
        return;
    };
    if tsa::parse_token(resp, signature).is_ok() {
        let _ = tsa::verify(resp, signature, &root().timestamp_authorities);
    }
});
