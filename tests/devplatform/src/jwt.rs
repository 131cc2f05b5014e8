//! Instance JWTs: HS256 tokens minted by `enroll` / `enroll/refresh` and checked on every
//! instance call. The HMAC is computed with aws-lc-rs directly; the format is small enough that a
//! JWT crate would add more surface than it saves. Only what node-api.md §2.2 names is produced
//! and verified (`type`, `sub`, `iat`, `exp`, `jti`, `iss`, `aud`, `version`).

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// `iss` of every token this platform mints.
pub const ISSUER: &str = "powernode-devplatform";
/// `aud` of every instance token: the node_api surface.
pub const AUDIENCE: &str = "powernode-node-api";
/// `type` claim value for instance tokens (the upstream platform uses the same string).
pub const TOKEN_TYPE_INSTANCE: &str = "instance";
/// Claim-set version; upstream sends 2.
pub const CLAIMS_VERSION: u32 = 2;
/// Length of the persisted HMAC secret.
pub const SECRET_LEN: usize = 32;

/// The claim set of an instance token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "type")]
    pub token_type: String,
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
    pub iss: String,
    pub aud: String,
    pub version: u32,
}

impl Claims {
    /// Claims for a fresh instance token valid for `ttl_secs` from `now` (Unix seconds).
    pub fn instance(instance_id: &str, now: i64, ttl_secs: u64) -> Self {
        Self {
            token_type: TOKEN_TYPE_INSTANCE.to_owned(),
            sub: instance_id.to_owned(),
            iat: now,
            exp: now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX)),
            jti: uuid::Uuid::new_v4().to_string(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            version: CLAIMS_VERSION,
        }
    }
}

/// Why a token was rejected. The `Display` text ends up after "Invalid instance token: ".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("unsupported algorithm")]
    Algorithm,
    #[error("signature verification failed")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("invalid issuer")]
    Issuer,
    #[error("invalid audience")]
    Audience,
    #[error("invalid token type")]
    TokenType,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// Signs and verifies HS256 tokens with one secret.
pub struct JwtKey {
    key: hmac::Key,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("JwtKey(..)")
    }
}

impl JwtKey {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Load the HMAC secret from `path`, creating 32 random bytes (mode 0600) on first use.
    pub fn load_or_create(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        if !path.exists() {
            let mut secret = [0u8; SECRET_LEN];
            aws_lc_rs::rand::fill(&mut secret)
                .map_err(|_| anyhow::anyhow!("random source failed"))?;
            crate::fsutil::write_atomic(path, &secret, crate::fsutil::MODE_SECRET)?;
        }
        let secret = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            secret.len() >= SECRET_LEN,
            "{} holds {} bytes, expected {SECRET_LEN}",
            path.display(),
            secret.len()
        );
        Ok(Self::new(&secret))
    }

    /// Encode and sign `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = Header {
            alg: "HS256".to_owned(),
            typ: Some("JWT".to_owned()),
        };
        // Serialising these plain structs cannot fail.
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let claims = serde_json::to_vec(claims).unwrap_or_default();
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let tag = hmac::sign(&self.key, signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Verify signature, algorithm, `exp` (against `now`, Unix seconds), `iss`, `aud` and `type`.
    /// `sub` is returned for the caller to match against the mTLS identity.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = decode_part(h)?;
        // Checking alg before the signature rules out "alg":"none" and key-confusion tricks.
        if header.alg != "HS256" {
            return Err(JwtError::Algorithm);
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        let signing_input = &token[..h.len() + 1 + c.len()];
        hmac::verify(&self.key, signing_input.as_bytes(), &sig).map_err(|_| JwtError::Signature)?;
        let claims: Claims = decode_part(c)?;
        if claims.exp <= now {
            return Err(JwtError::Expired);
        }
        if claims.iss != ISSUER {
            return Err(JwtError::Issuer);
        }
        if claims.aud != AUDIENCE {
            return Err(JwtError::Audience);
        }
        if claims.token_type != TOKEN_TYPE_INSTANCE {
            return Err(JwtError::TokenType);
        }
        Ok(claims)
    }
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn key() -> JwtKey {
        JwtKey::new(&[7u8; SECRET_LEN])
    }

    #[test]
    fn round_trip_keeps_every_claim() {
        let claims = Claims::instance("0190-abc", NOW, 3600);
        let token = key().sign(&claims);
        assert_eq!(token.split('.').count(), 3);
        let back = key().verify(&token, NOW + 10).expect("valid token");
        assert_eq!(back, claims);
        assert_eq!(back.exp, NOW + 3600);
        assert_eq!(back.token_type, "instance");
        assert_eq!(back.version, 2);
        assert_eq!(back.iss, ISSUER);
        assert_eq!(back.aud, AUDIENCE);
    }

    #[test]
    fn rejections() {
        let good = key().sign(&Claims::instance("i", NOW, 60));
        let other_key = JwtKey::new(&[8u8; SECRET_LEN]).sign(&Claims::instance("i", NOW, 60));
        let mut wrong_type = Claims::instance("i", NOW, 60);
        wrong_type.token_type = "user".into();
        let mut wrong_aud = Claims::instance("i", NOW, 60);
        wrong_aud.aud = "elsewhere".into();
        let mut wrong_iss = Claims::instance("i", NOW, 60);
        wrong_iss.iss = "someone".into();
        // Flip one claim byte while keeping the old signature.
        let (head, rest) = good.split_once('.').expect("dot");
        let (_, sig) = rest.split_once('.').expect("dot");
        let forged_claims = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&Claims::instance("other", NOW, 60)).expect("json"));
        let forged = format!("{head}.{forged_claims}.{sig}");
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let alg_none = format!("{none_header}.{forged_claims}.");

        let cases: Vec<(&str, String, i64, JwtError)> = vec![
            ("expired", good.clone(), NOW + 60, JwtError::Expired),
            ("other key", other_key, NOW, JwtError::Signature),
            ("forged claims", forged, NOW, JwtError::Signature),
            ("alg none", alg_none, NOW, JwtError::Algorithm),
            ("garbage", "abc".into(), NOW, JwtError::Malformed),
            ("four parts", format!("{good}.x"), NOW, JwtError::Malformed),
            ("type", key().sign(&wrong_type), NOW, JwtError::TokenType),
            ("aud", key().sign(&wrong_aud), NOW, JwtError::Audience),
            ("iss", key().sign(&wrong_iss), NOW, JwtError::Issuer),
        ];
        for (name, token, now, want) in cases {
            assert_eq!(key().verify(&token, now), Err(want), "case {name}");
        }
    }

    #[test]
    fn secret_is_persisted_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwt.secret");
        let token = JwtKey::load_or_create(&path)
            .expect("create")
            .sign(&Claims::instance("i", NOW, 60));
        let again = JwtKey::load_or_create(&path).expect("load");
        assert!(
            again.verify(&token, NOW).is_ok(),
            "same secret after reload"
        );
        assert_eq!(std::fs::read(&path).expect("read").len(), SECRET_LEN);
    }

    #[test]
    fn debug_hides_secret() {
        assert_eq!(format!("{:?}", key()), "JwtKey(..)");
    }
}
