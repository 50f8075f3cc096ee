//! API keys: `Authorization: Bearer <key>`, compared in constant time.
//!
//! Keys come from `auth.api_keys`, the environment variable named by `auth.api_keys_env`
//! (comma-separated), and the named `[[auth.keys]]` (by sha256, or from a variable), which
//! carry their own limits (`crate::accounts`). Only sha256 digests are kept, so a key never
//! sits in memory the logs or `/info` could show; comparing fixed-length digests with
//! `subtle` also hides the key's length and where a guess first differs.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::accounts::KeyPolicy;
use crate::config::AuthConfig;

/// The keys a node accepts.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    /// Each key's name and limits, in the same order.
    policies: Vec<Arc<KeyPolicy>>,
    /// What `/info` may show of each key: its last four characters (a named key: its name).
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
    /// The configured keys, those in `auth.api_keys_env`, and the named `[[auth.keys]]`.
    /// Fails when a named key's `key_env` variable is unset or empty.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, String> {
        let mut keys = ApiKeys::default();
        let mut plain = |key: &str, name: String| {
            keys.digests.push(digest(key));
            keys.hints.push(redact(key));
            keys.policies.push(Arc::new(KeyPolicy::unlimited(name)));
        };
        for (i, k) in cfg.api_keys.iter().map(|k| k.trim()).enumerate() {
            plain(k, format!("api_keys[{i}]"));
        }
        let from_env = std::env::var(&cfg.api_keys_env).unwrap_or_default();
        for (i, k) in from_env.split(',').map(str::trim).filter(|k| !k.is_empty()).enumerate() {
            plain(k, format!("{}[{i}]", cfg.api_keys_env));
        }
        for k in &cfg.keys {
            let d = match (&k.sha256, &k.key_env) {
                (Some(hex_digest), _) => {
                    let bytes = hex::decode(hex_digest).map_err(|e| format!("auth.keys {:?}: sha256: {e}", k.name))?;
                    bytes.try_into().map_err(|_| format!("auth.keys {:?}: sha256 must be 32 bytes", k.name))?
                }
                (None, Some(var)) => match std::env::var(var) {
                    Ok(v) if !v.trim().is_empty() => digest(v.trim()),
                    _ => return Err(format!("auth.keys {:?}: the variable {var} named by key_env is not set", k.name)),
                },
                (None, None) => return Err(format!("auth.keys {:?}: give sha256 or key_env", k.name)),
            };
            keys.digests.push(d);
            keys.hints.push(k.name.clone());
            keys.policies.push(Arc::new(KeyPolicy::from_config(k)));
        }
        Ok(keys)
    }

    /// The key this `Authorization` header value carries, if accepted. Every key is
    /// compared, whatever matched, so the time taken says nothing about which.
    pub fn identify(&self, authorization: Option<&str>) -> Option<Arc<KeyPolicy>> {
        let presented = authorization.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))?;
        let d = digest(presented.trim());
        let mut found = u32::MAX;
        for (i, k) in self.digests.iter().enumerate() {
            found.conditional_assign(&(i as u32), k.ct_eq(&d));
        }
        self.policies.get(found as usize).cloned()
    }

    /// Every key's name and limits.
    pub fn policies(&self) -> &[Arc<KeyPolicy>] {
        &self.policies
    }

    /// True when any key is configured.
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Does this `Authorization` header value carry an accepted key?
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        self.identify(authorization).is_some()
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
        let named = crate::config::KeyConfig {
            name: "mobile".into(),
            sha256: Some(hex::encode(Sha256::digest(b"sk-mobile-key"))),
            key_env: None,
            requests_per_minute: Some(5),
            tokens_per_minute: None,
            daily_budget_usd: None,
            models: vec![],
        };
        let cfg = AuthConfig {
            api_keys: vec!["sk-edge-0123456789".into()],
            api_keys_env: "EDGENODE_TEST_NO_SUCH_VAR_".into(),
            protect_probes: false,
            keys: vec![named],
        };
        let keys = ApiKeys::from_config(&cfg).unwrap();
        assert_eq!(keys.identify(Some("Bearer sk-mobile-key")).unwrap().requests_per_minute, Some(5));
        assert_eq!(keys.identify(Some("Bearer sk-edge-0123456789")).unwrap().name, "api_keys[0]");
        assert!(keys.enabled());
        assert!(keys.accepts(Some("Bearer sk-edge-0123456789")));
        assert!(!keys.accepts(Some("Bearer sk-edge-012345678")));
        assert!(!keys.accepts(Some("sk-edge-0123456789")));
        assert!(!keys.accepts(None));
        assert_eq!(keys.hints(), ["…6789", "mobile"]);
        assert!(!format!("{keys:?}").contains("sk-edge"));
    }
}
