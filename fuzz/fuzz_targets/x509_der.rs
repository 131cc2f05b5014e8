//! The DER layer and everything built on it that reads certificates and keys: the DER reader
//! (whole trees, recursively), X.509 through x509-parser plus the accessors the verifier uses,
//! SPKI public keys, and the embedded-SCT path against a certificate from the same input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use powernode::verify::cert::Certificate;
use powernode::verify::der;
use powernode::verify::keys::PublicKey;

/// Walks every constructed element; depth-bounded like any real DER reader must be.
fn walk(input: &[u8], depth: usize) {
    if depth > 32 {
        return;
    }
    let Ok(children) = der::children(input) else {
        return;
    };
    for c in children {
        assert!(c.raw.len() >= c.value.len());
        if c.tag & 0x20 != 0 {
            walk(c.value, depth + 1);
        }
        if c.tag == der::GENERALIZED_TIME {
            let _ = der::generalized_time(c.value);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    walk(data, 0);
    let _ = PublicKey::from_spki_der(data);
    if let Ok(c) = Certificate::from_der(data) {
        // Every parsed certificate re-encodes to the bytes it came from.
        assert_eq!(c.der, data);
        let _ = c.public_key();
        let _ = c.is_ca();
        let _ = c.san_values();
        let _ = c.oidc_issuer();
        let _ = c.is_self_signed();
        let _ = c.verify_embedded_sct(&c, &[]);
        let _ = powernode::verify::cert::verify_chain(&c, std::slice::from_ref(&c), &[0]);
    }
});
