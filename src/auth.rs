//! API keys: `Authorization: Bearer <key>`, compared in constant time.
//!
//! Keys come from `auth.api_keys` and the environment variable named by
//! `auth.api_keys_env` (comma-separated). Only their sha256 digests are kept, so a key never
//! sits in memory the logs or `/info` could show; comparing fixed-length digests with
//! `subtle` also hides the key's length and where a guess first differs.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

/// The keys a node accepts.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    /// What `/info` may show of each key: its last four characters.
    hints: Vec<String>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// The configured keys plus those in `auth.api_keys_env`.
    pub fn from_config(cfg: &AuthConfig) -> Self {
        let from_env = std::env::var(&cfg.api_keys_env).unwrap_or_default();
        let keys: Vec<&str> = cfg.api_keys.iter().map(String::as_str).chain(from_env.split(',')).map(str::trim).filter(|k| !k.is_empty()).collect();
        ApiKeys { digests: keys.iter().map(|k| digest(k)).collect(), hints: keys.iter().map(|k| redact(k)).collect() }
    }

    /// True when any key is configured.
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Does this `Authorization` header value carry an accepted key? Every key is compared,
    /// whatever matched, so the time taken says nothing about which.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(presented) = authorization.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer "))) else {
            return false;
        };
        let d = digest(presented.trim());
        let mut ok = subtle::Choice::from(0u8);
        for k in &self.digests {
            ok |= k.ct_eq(&d);
        }
        ok.into()
    }

    /// Redacted keys for `/info`.
    pub fn hints(&self) -> &[String] {
        &self.hints
    }
}

/// `…abcd`: enough to tell keys apart, not enough to use one.
fn redact(key: &str) -> String {
    let tail: String = key.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
    if key.chars().count() <= 8 {
        "…".to_string()
    } else {
        format!("…{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_keys_as_bearer_tokens() {
        let cfg =
            AuthConfig { api_keys: vec!["sk-edge-0123456789".into()], api_keys_env: "EDGENODE_TEST_NO_SUCH_VAR_".into(), protect_probes: false };
        let keys = ApiKeys::from_config(&cfg);
        assert!(keys.enabled());
        assert!(keys.accepts(Some("Bearer sk-edge-0123456789")));
        assert!(!keys.accepts(Some("Bearer sk-edge-012345678")));
        assert!(!keys.accepts(Some("sk-edge-0123456789")));
        assert!(!keys.accepts(None));
        assert_eq!(keys.hints(), ["…6789"]);
        assert!(!format!("{keys:?}").contains("sk-edge"));
    }
}
