//! HashiCorp Vault / OpenBao transit provider.
//!
//! Wrap = `transit/encrypt/KEY` of the base64 DEK with the wrap context as
//! `associated_data` (AEAD keys: aes*-gcm96, chacha20-poly1305), plus
//! `context` when the key was created with `derived=true`. Unwrap =
//! `transit/decrypt/KEY` with the same; [`KeyProvider::unwrap_many`] sends
//! `batch_input` in chunks of at most [`BATCH_MAX`] items. The wrapped DEK is
//! the `vault:vN:...` ciphertext string; its key reference is provider
//! `vault`, key ID `MOUNT/KEY`, version `N`.
//!
//! `vaultrs` builds the HTTP client (address, namespace, CA certificate,
//! client identity, TLS verification) and performs AppRole/Kubernetes logins;
//! the transit calls go through that same HTTP client as plain JSON, since
//! vaultrs has no `batch_input`. The timeout layer
//! ([`Instrumented`](super::instrumented::Instrumented), and
//! [`KmsConfig::build`](super::config::KmsConfig::build) for connecting)
//! bounds every call by `timeout_secs`. Tokens, secret IDs and JWTs never
//! appear in logs or errors.
//!
//! The module's parts: `config` (settings and the HTTP client), `login`
//! (the token and its renewal), `http` (one request and what a failed answer
//! means); this file is the transit key itself.

mod config;
mod http;
mod login;

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use vaultrs::client::VaultClient;
use zeroize::Zeroizing;

pub use self::config::{VaultAuth, VaultConfig};
use self::http::Op;
use self::login::TokenState;
use super::support::{bad_response, clean_message, ensure_handles};
use super::{KeyProvider, KeyRef, KmsError, WrapContext, WrappedDek};
use crate::crypto::Dek;

const PROVIDER: &str = "vault";

/// Most items per `batch_input` request.
pub const BATCH_MAX: usize = 250;
/// OpenBao refuses JSON requests with more than 1000 strings (listener
/// `max_request_json_strings`), counting object keys; each batch item has 4
/// (ciphertext, associated_data) or 6 (plus context). Stay below with margin.
const JSON_STRINGS_BUDGET: usize = 960;

/// What the transit key's metadata says.
#[derive(Debug, Clone)]
struct KeyFacts {
    derived: bool,
}

/// A Vault/OpenBao transit key.
pub struct VaultKms {
    cfg: VaultConfig,
    client: VaultClient,
    /// Address without a trailing slash.
    base: String,
    token: RwLock<TokenState>,
    /// Serializes re-logins.
    login_lock: tokio::sync::Mutex<()>,
    derived: bool,
    /// Token given by the embedder instead of VAULT_TOKEN.
    token_override: Option<Zeroizing<String>>,
}

impl VaultKms {
    /// Builds the client, logs in and reads the transit key (which proves
    /// reachability, credentials and the key's existence, and tells whether
    /// the key is derived).
    pub async fn connect(cfg: &VaultConfig) -> Result<Arc<dyn KeyProvider>, KmsError> {
        Ok(Arc::new(Self::open(cfg).await?))
    }

    /// [`connect`](Self::connect) returning the concrete type.
    async fn open(cfg: &VaultConfig) -> Result<Self, KmsError> {
        Self::connect_inner(cfg, None).await
    }

    /// Like [`connect`](Self::connect) with token auth, but with `token`
    /// instead of VAULT_TOKEN (for embedding and tests; `cfg.auth` is ignored).
    pub async fn connect_with_token(cfg: &VaultConfig, token: &str) -> Result<Self, KmsError> {
        Self::connect_inner(cfg, Some(Zeroizing::new(token.to_owned()))).await
    }

    async fn connect_inner(
        cfg: &VaultConfig, token: Option<Zeroizing<String>>,
    ) -> Result<Self, KmsError> {
        let mut cfg = cfg.clone();
        if token.is_some() {
            cfg.auth = VaultAuth::Token;
        }
        let cfg = &cfg;
        let client = config::build_client(cfg)?;
        let mut kms = VaultKms {
            cfg: cfg.clone(),
            client,
            base: cfg.address.trim_end_matches('/').to_owned(),
            token: RwLock::new(TokenState::none()),
            login_lock: tokio::sync::Mutex::new(()),
            derived: false,
            token_override: token,
        };
        let state = kms.login().await?;
        *kms.token.write().unwrap() = state;
        match kms.read_key().await {
            Ok(facts) => kms.derived = facts.derived,
            // A least-privilege policy may allow only encrypt/decrypt; the
            // key is then checked by the first wrap or unwrap.
            Err(KmsError::PermissionDenied { .. }) => tracing::warn!(
                "{}: the token may not read transit key {}/{} (policy lacks read on {}/keys/{}); \
                 not checking that it exists. Note that transit encrypt creates a missing key \
                 when the policy allows `create`",
                cfg.kms_name(),
                cfg.mount,
                cfg.key,
                cfg.mount,
                cfg.key
            ),
            Err(e) => return Err(e),
        }
        Ok(kms)
    }

    fn kms(&self) -> String {
        self.cfg.kms_name()
    }

    fn key_id(&self) -> String {
        format!("{}/{}", self.cfg.mount.trim_matches('/'), self.cfg.key)
    }

    /// Reads the key's metadata; checks it is usable for kmsfs.
    async fn read_key(&self) -> Result<KeyFacts, KmsError> {
        let ans = self.request(&self.op_path(Op::ReadKey), None).await?;
        if !ans.is_success() {
            return Err(self.classify(Op::ReadKey, &ans, None).await);
        }
        let data = &ans.body["data"];
        let ktype = data["type"].as_str().unwrap_or("");
        let aead = ktype.ends_with("-gcm96") || ktype.ends_with("chacha20-poly1305");
        if !aead {
            return Err(KmsError::Config(format!(
                "{}: transit key {} has type {ktype:?}; kmsfs needs an AEAD key \
                 (aes256-gcm96, aes128-gcm96 or chacha20-poly1305) to bind each file's ID",
                self.kms(),
                self.key_id()
            )));
        }
        if data["supports_encryption"] == Value::Bool(false)
            || data["supports_decryption"] == Value::Bool(false)
        {
            return Err(KmsError::Config(format!(
                "{}: transit key {} does not support encryption and decryption",
                self.kms(),
                self.key_id()
            )));
        }
        Ok(KeyFacts {
            derived: data["derived"].as_bool().unwrap_or(false),
        })
    }

    /// The context fields of an encrypt/decrypt item.
    fn bind(&self, item: &mut serde_json::Map<String, Value>, ctx: &WrapContext) {
        let bytes = B64.encode(ctx.canonical_bytes());
        if self.derived {
            item.insert("context".into(), Value::String(bytes.clone()));
        }
        item.insert("associated_data".into(), Value::String(bytes));
    }

    /// Checks that `wrapped` belongs to this key and returns its ciphertext
    /// and version.
    fn parse_blob<'a>(&self, wrapped: &'a WrappedDek) -> Result<(&'a str, String), KmsError> {
        ensure_handles(self, &wrapped.key_ref)?;
        let bad = |d: &str| KmsError::UnwrapFailed {
            kms: self.kms(),
            detail: d.to_owned(),
        };
        let ct = std::str::from_utf8(&wrapped.blob)
            .map_err(|_| bad("the wrapped DEK is not a transit ciphertext"))?;
        let version = ciphertext_version(ct)
            .ok_or_else(|| bad("the wrapped DEK is not a `vault:vN:` ciphertext"))?;
        if !wrapped.key_ref.key_version.is_empty()
            && wrapped.key_ref.key_version != version.to_string()
        {
            return Err(bad(&format!(
                "the header names key version {} but the ciphertext is version {version}",
                wrapped.key_ref.key_version
            )));
        }
        Ok((ct, version.to_string()))
    }

    fn bad_response(&self, op: Op, detail: &str) -> KmsError {
        bad_response(self.kms(), op.direction(), op.name(), detail)
    }

    fn dek_from_b64(&self, b64: &str) -> Result<Dek, KmsError> {
        let mut raw = Zeroizing::new(Vec::with_capacity(48));
        B64.decode_vec(b64, &mut raw)
            .map_err(|_| self.bad_response(Op::Decrypt, "the plaintext is not base64"))?;
        Dek::from_slice(&raw).map_err(|e| {
            self.bad_response(Op::Decrypt, &format!("the plaintext is not a DEK: {e}"))
        })
    }

    /// One batch decrypt request of at most BATCH_MAX prepared items.
    async fn decrypt_chunk(
        &self, items: &[(&str, String, &WrapContext)],
    ) -> Vec<Result<Dek, KmsError>> {
        let batch: Vec<Value> = items
            .iter()
            .map(|(ct, _, ctx)| {
                let mut m = serde_json::Map::new();
                m.insert("ciphertext".into(), Value::String((*ct).to_owned()));
                self.bind(&mut m, ctx);
                Value::Object(m)
            })
            .collect();
        let body = json!({ "batch_input": batch });
        let ans = match self.request(&self.op_path(Op::Decrypt), Some(&body)).await {
            Ok(a) => a,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        let results = ans.body["data"]["batch_results"].as_array();
        let Some(results) = results.filter(|r| r.len() == items.len()) else {
            let e = if ans.is_success() {
                self.bad_response(Op::Decrypt, "no batch_results of the right length")
            } else {
                self.classify(Op::Decrypt, &ans, None).await
            };
            return items.iter().map(|_| Err(e.clone())).collect();
        };
        results
            .iter()
            .zip(items)
            .map(|(r, (_, version, _))| {
                let err = clean_message(r["error"].as_str().unwrap_or(""));
                if !err.is_empty() {
                    let detail = format!("HTTP {}: {err}", ans.status);
                    return Err(self.classify_message(Op::Decrypt, &err, &detail, Some(version)));
                }
                let pt = Zeroizing::new(r["plaintext"].as_str().unwrap_or("").to_owned());
                self.dek_from_b64(&pt)
            })
            .collect()
    }
}

/// `N` of a `vault:vN:...` ciphertext.
fn ciphertext_version(ct: &str) -> Option<u32> {
    let rest = ct.strip_prefix("vault:v")?;
    let (n, body) = rest.split_once(':')?;
    if body.is_empty() {
        return None;
    }
    n.parse().ok()
}

#[async_trait]
impl KeyProvider for VaultKms {
    fn describe(&self) -> String {
        format!("{} (transit key {})", self.kms(), self.key_id())
    }

    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn handles(&self, key_ref: &KeyRef) -> bool {
        key_ref.provider == PROVIDER && key_ref.key_id == self.key_id()
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        let mut m = serde_json::Map::new();
        m.insert(
            "plaintext".into(),
            Value::String(B64.encode(dek.as_bytes())),
        );
        self.bind(&mut m, ctx);
        let body = Value::Object(m);
        let ans = self.request(&self.op_path(Op::Encrypt), Some(&body)).await;
        // Best effort: scrub the base64 DEK from our copy of the request.
        if let Value::Object(mut m) = body {
            if let Some(Value::String(s)) = m.remove("plaintext") {
                drop(Zeroizing::new(s));
            }
        }
        let ans = ans?;
        if !ans.is_success() {
            return Err(self.classify(Op::Encrypt, &ans, None).await);
        }
        let ct = ans.body["data"]["ciphertext"].as_str().unwrap_or("");
        let version = ciphertext_version(ct)
            .ok_or_else(|| self.bad_response(Op::Encrypt, "no `vault:vN:` ciphertext"))?;
        Ok(WrappedDek {
            key_ref: KeyRef {
                provider: PROVIDER.into(),
                key_id: self.key_id(),
                key_version: version.to_string(),
            },
            blob: ct.as_bytes().to_vec(),
        })
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        let (ct, version) = self.parse_blob(wrapped)?;
        let mut m = serde_json::Map::new();
        m.insert("ciphertext".into(), Value::String(ct.to_owned()));
        self.bind(&mut m, ctx);
        let ans = self
            .request(&self.op_path(Op::Decrypt), Some(&Value::Object(m)))
            .await?;
        if !ans.is_success() {
            return Err(self.classify(Op::Decrypt, &ans, Some(&version)).await);
        }
        let pt = Zeroizing::new(
            ans.body["data"]["plaintext"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
        self.dek_from_b64(&pt)
    }

    async fn unwrap_many(&self, items: &[(WrappedDek, WrapContext)]) -> Vec<Result<Dek, KmsError>> {
        let mut out: Vec<Option<Result<Dek, KmsError>>> = (0..items.len()).map(|_| None).collect();
        let mut good: Vec<(usize, (&str, String, &WrapContext))> = Vec::new();
        for (i, (w, ctx)) in items.iter().enumerate() {
            match self.parse_blob(w) {
                Ok((ct, v)) => good.push((i, (ct, v, ctx))),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let strings_per_item = if self.derived { 6 } else { 4 };
        let chunk_len = BATCH_MAX.min(JSON_STRINGS_BUDGET / strings_per_item);
        for chunk in good.chunks(chunk_len) {
            let prepared: Vec<(&str, String, &WrapContext)> =
                chunk.iter().map(|(_, p)| p.clone()).collect();
            let results = self.decrypt_chunk(&prepared).await;
            for ((i, _), r) in chunk.iter().zip(results) {
                out[*i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }

    async fn check(&self) -> Result<(), KmsError> {
        self.read_key().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertext_versions() {
        assert_eq!(ciphertext_version("vault:v1:abc"), Some(1));
        assert_eq!(ciphertext_version("vault:v12:abc"), Some(12));
        assert_eq!(ciphertext_version("vault:v:abc"), None);
        assert_eq!(ciphertext_version("vault:v1:"), None);
        assert_eq!(ciphertext_version("v1:abc"), None);
    }
}
