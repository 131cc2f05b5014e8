//! The Sigstore bundle parser and the whole verify path, against the two trust roots the
//! conformance bundles were made for (production Rekor v1 and the staging Rekor v2 log). The
//! artifact is the conformance `a.txt`, so a seed bundle reaches the signature checks.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use powernode::verify::{self, Artifact, Bundle, Matcher, Policy, TrustedRoot};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/sigstore");

struct Setup {
    roots: Vec<TrustedRoot>,
    artifact: Artifact,
    policy: Policy,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let read = |rel: &str| {
            std::fs::read(format!("{FIXTURES}/{rel}")).unwrap_or_else(|e| panic!("{rel}: {e}"))
        };
        let roots = [
            "public-good/trusted_root.json",
            "bundle-verify/rekor2-happy-path/trusted_root.json",
        ]
        .iter()
        .map(|r| TrustedRoot::from_json(&read(r)).expect("trusted root"))
        .collect();
        Setup {
            roots,
            artifact: Artifact::Bytes(read("bundle-verify/a.txt")),
            policy: Policy::Identity {
                identity: Matcher::regex(".*").expect("regex"),
                issuer: Matcher::regex(".*").expect("regex"),
            },
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let Ok(bundle) = Bundle::from_json(data) else {
        return;
    };
    for root in &s.roots {
        let _ = verify::verify(root, &bundle, &s.artifact, &s.policy);
    }
});
