//! HashiCorp Vault / OpenBao transit provider.
//!
//! Wrap = `transit/encrypt/KEY` of the base64 DEK with the wrap context as
//! `associated_data` (AEAD keys: aes*-gcm96, chacha20-poly1305), plus
//! `context` when the key was created with `derived=true`. Unwrap =
//! `transit/decrypt/KEY` with the same; [`KeyProvider::wrap_many`] and
//! [`KeyProvider::unwrap_many`] send `batch_input` in chunks of at most
//! [`BATCH_MAX`] items (fewer when the server's JSON string limit says so),
//! one request per chunk. The wrapped DEK is the `vault:vN:...` ciphertext
//! string; its key reference is provider `vault`, key ID `MOUNT/KEY`,
//! version `N`.
//!
//! [`KeyProvider::key_versions`] reads `MOUNT/keys/KEY` (`latest_version`,
//! the `keys` creation times, `min_decryption_version`);
//! [`KeyProvider::rotate`] posts to `MOUNT/keys/KEY/rotate`.
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
use super::{KeyProvider, KeyRef, KeyVersion, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::crypto::Dek;

const PROVIDER: &str = "vault";

/// Most items per `batch_input` request.
pub const BATCH_MAX: usize = 250;
/// OpenBao refuses JSON requests with more than 1000 strings (listener
/// `max_request_json_strings`), counting object keys; each batch item has 4
/// (ciphertext or plaintext, associated_data) or 6 (plus context). Stay
/// below with margin.
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
        let mut cfg = cfg.with_environment();
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

    /// The `data` of `GET MOUNT/keys/KEY`: the key's metadata.
    async fn read_key_data(&self) -> Result<Value, KmsError> {
        let ans = self.request(&self.op_path(Op::ReadKey), None).await?;
        if !ans.is_success() {
            return Err(self.classify(Op::ReadKey, &ans, None).await);
        }
        let mut body = ans.body;
        Ok(body["data"].take())
    }

    /// Reads the key's metadata; checks it is usable for kmsfs.
    async fn read_key(&self) -> Result<KeyFacts, KmsError> {
        let data = &self.read_key_data().await?;
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

    /// Items per `batch_input` request: the server counts every JSON string
    /// of a request, object keys included (2 per field of an item).
    fn chunk_len(&self) -> usize {
        let strings_per_item = if self.derived { 6 } else { 4 };
        BATCH_MAX.min(JSON_STRINGS_BUDGET / strings_per_item)
    }

    /// The wrapped DEK of an encrypt answer's `ciphertext`.
    fn wrapped_from(&self, ct: &str) -> Result<WrappedDek, KmsError> {
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

    /// The key's versions as its metadata (`GET MOUNT/keys/KEY`, or the
    /// answer to a rotation) tells them.
    fn versions_from(&self, data: &Value) -> Result<KeyVersions, KmsError> {
        parse_versions(data).map_err(|what| self.bad_response(Op::ReadKey, what))
    }

    /// One batch encrypt request of at most [`chunk_len`](Self::chunk_len)
    /// items.
    async fn encrypt_chunk(
        &self, items: &[(&Dek, WrapContext)],
    ) -> Vec<Result<WrappedDek, KmsError>> {
        let batch: Vec<Value> = items
            .iter()
            .map(|(dek, ctx)| {
                let mut m = serde_json::Map::new();
                m.insert(
                    "plaintext".into(),
                    Value::String(B64.encode(dek.as_bytes())),
                );
                self.bind(&mut m, ctx);
                Value::Object(m)
            })
            .collect();
        let body = json!({ "batch_input": batch });
        let ans = self.request(&self.op_path(Op::Encrypt), Some(&body)).await;
        scrub_plaintexts(body);
        let ans = match ans {
            Ok(a) => a,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        let results = ans.body["data"]["batch_results"].as_array();
        let Some(results) = results.filter(|r| r.len() == items.len()) else {
            let e = if ans.is_success() {
                self.bad_response(Op::Encrypt, "no batch_results of the right length")
            } else {
                self.classify(Op::Encrypt, &ans, None).await
            };
            return items.iter().map(|_| Err(e.clone())).collect();
        };
        results
            .iter()
            .map(|r| {
                let err = clean_message(r["error"].as_str().unwrap_or(""));
                if !err.is_empty() {
                    let detail = format!("HTTP {}: {err}", ans.status);
                    return Err(self.classify_message(Op::Encrypt, &err, &detail, None));
                }
                self.wrapped_from(r["ciphertext"].as_str().unwrap_or(""))
            })
            .collect()
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

/// The versions of a transit key's metadata. Vault and OpenBao leave
/// versions below `min_decryption_version` (and trimmed ones, below
/// `min_available_version`) out of `keys`; they are listed here too, as
/// versions that no longer unwrap, so that headers naming them stand out.
fn parse_versions(data: &Value) -> Result<KeyVersions, &'static str> {
    let latest = data["latest_version"]
        .as_u64()
        .filter(|v| *v >= 1)
        .ok_or("no latest_version")?;
    let times = data["keys"].as_object().ok_or("no keys")?;
    let min_decrypt = data["min_decryption_version"].as_u64().unwrap_or(1);
    let min_available = data["min_available_version"].as_u64().unwrap_or(0);
    let mut numbers: Vec<u64> = times.keys().filter_map(|k| k.parse().ok()).collect();
    // Versions are 1..=latest; those below either minimum are not in `keys`.
    let below = min_decrypt.max(min_available).saturating_sub(1);
    numbers.extend(1..=latest.min(below));
    numbers.push(latest);
    numbers.sort_unstable();
    numbers.dedup();
    let versions: Vec<KeyVersion> = numbers
        .into_iter()
        .map(|v| {
            let entry = times.get(&v.to_string());
            KeyVersion {
                version: v.to_string(),
                created: entry.and_then(creation_time),
                can_unwrap: entry.is_some() && v >= min_decrypt && v >= min_available,
            }
        })
        .collect();
    let current = latest.to_string();
    let current_created = versions
        .iter()
        .find(|v| v.version == current)
        .and_then(|v| v.created);
    Ok(KeyVersions {
        current: Some(current),
        current_created,
        versions,
    })
}

/// Best effort: zeroizes every `plaintext` string of a request body (the
/// base64 DEKs) before it is freed.
fn scrub_plaintexts(body: Value) {
    match body {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::String(s) if k == "plaintext" => drop(Zeroizing::new(s)),
                    other => scrub_plaintexts(other),
                }
            }
        }
        Value::Array(a) => a.into_iter().for_each(scrub_plaintexts),
        _ => {}
    }
}

/// A version's creation time in a key's `keys` map, in seconds since the
/// Unix epoch: an integer for symmetric keys, an RFC 3339 string (or an
/// object with `creation_time`, for asymmetric keys) otherwise.
fn creation_time(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok().or_else(|| rfc3339_secs(s.trim())),
        Value::Object(m) => m.get("creation_time").and_then(creation_time),
        _ => None,
    }
}

/// Seconds since the Unix epoch of an RFC 3339 time such as
/// `2024-05-06T07:08:09.123456789Z` or `2024-05-06T09:08:09+02:00`.
fn rfc3339_secs(s: &str) -> Option<i64> {
    let num = |from: usize, len: usize| -> Option<i64> {
        let t = s.get(from..from + len)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let sep = |at: usize, any: &[u8]| s.as_bytes().get(at).is_some_and(|c| any.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let tz = &rest[1..];
            if tz.len() != 5 || tz.as_bytes()[2] != b':' {
                return None;
            }
            let (h, m): (i64, i64) = (tz[..2].parse().ok()?, tz[3..].parse().ok()?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
        scrub_plaintexts(body);
        let ans = ans?;
        if !ans.is_success() {
            return Err(self.classify(Op::Encrypt, &ans, None).await);
        }
        self.wrapped_from(ans.body["data"]["ciphertext"].as_str().unwrap_or(""))
    }

    async fn wrap_many(&self, items: &[(&Dek, WrapContext)]) -> Vec<Result<WrappedDek, KmsError>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.chunk_len()) {
            out.extend(self.encrypt_chunk(chunk).await);
        }
        out
    }

    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        self.versions_from(&self.read_key_data().await?)
    }

    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        let ans = self
            .request(&self.op_path(Op::Rotate), Some(&json!({})))
            .await?;
        if !ans.is_success() {
            return Err(self.classify(Op::Rotate, &ans, None).await);
        }
        // OpenBao (and recent Vault) answer with the key's new state, which
        // spares a read the token's policy might not allow; older Vault
        // answers 204.
        let data = &ans.body["data"];
        if data["latest_version"].is_u64() && data["keys"].is_object() {
            return self.versions_from(data);
        }
        self.key_versions().await
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
        for chunk in good.chunks(self.chunk_len()) {
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

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_secs("2024-02-29T12:34:56Z"), Some(1_709_210_096));
        assert_eq!(
            rfc3339_secs("2024-02-29T12:34:56.123456789Z"),
            Some(1_709_210_096)
        );
        assert_eq!(
            rfc3339_secs("2024-02-29T14:34:56+02:00"),
            Some(1_709_210_096)
        );
        assert_eq!(
            rfc3339_secs("2024-02-29T07:04:56-05:30"),
            Some(1_709_210_096)
        );
        assert_eq!(rfc3339_secs("1969-12-31T23:59:59Z"), Some(-1));
        for bad in [
            "",
            "2024-02-29",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:34:56",
            "2024-02-29T12:34:56.Z",
            "2024-02-29T12:34:56+0200",
            "2024-02-29T12:34:+6Z",
        ] {
            assert_eq!(rfc3339_secs(bad), None, "{bad}");
        }
        assert_eq!(creation_time(&json!(1_700_000_000)), Some(1_700_000_000));
        assert_eq!(creation_time(&json!("1970-01-01T00:01:00Z")), Some(60));
        assert_eq!(
            creation_time(&json!({ "creation_time": "1970-01-01T00:01:00Z", "name": "rsa" })),
            Some(60)
        );
        assert_eq!(creation_time(&json!(null)), None);
    }

    #[test]
    fn versions_of_key_metadata() {
        // As OpenBao 2.7 answers after a rotation and min_decryption_version=2:
        // version 1 is no longer in `keys`.
        let data = json!({
            "keys": { "2": 1_796_052_603, "3": "2026-11-30T00:00:00Z" },
            "latest_version": 3,
            "min_available_version": 0,
            "min_decryption_version": 2,
            "min_encryption_version": 0,
        });
        let v = parse_versions(&data).unwrap();
        assert_eq!(v.current.as_deref(), Some("3"));
        assert_eq!(v.current_created, Some(1_795_996_800));
        let got: Vec<(&str, Option<i64>, bool)> = v
            .versions
            .iter()
            .map(|k| (k.version.as_str(), k.created, k.can_unwrap))
            .collect();
        assert_eq!(
            got,
            [
                ("1", None, false),
                ("2", Some(1_796_052_603), true),
                ("3", Some(1_795_996_800), true)
            ]
        );
        // A fresh key.
        let v = parse_versions(&json!({
            "keys": { "1": 5 }, "latest_version": 1, "min_decryption_version": 1
        }))
        .unwrap();
        assert_eq!(v.current.as_deref(), Some("1"));
        assert_eq!(v.current_created, Some(5));
        assert_eq!(v.versions.len(), 1);
        assert!(v.versions[0].can_unwrap);
        // Versions trimmed below min_available_version are gone for good.
        let v = parse_versions(&json!({
            "keys": { "3": 5, "4": 6 }, "latest_version": 4,
            "min_decryption_version": 3, "min_available_version": 3
        }))
        .unwrap();
        let usable: Vec<bool> = v.versions.iter().map(|k| k.can_unwrap).collect();
        assert_eq!(usable, [false, false, true, true]);
        assert!(parse_versions(&json!({ "keys": {} })).is_err());
        assert!(parse_versions(&json!({ "latest_version": 1 })).is_err());
    }

    #[test]
    fn scrubbing_keeps_other_fields_alone() {
        // Only checks that it walks the shapes without panicking.
        scrub_plaintexts(json!({
            "batch_input": [{ "plaintext": "AAAA", "associated_data": "YQ==" }, 3, null],
            "plaintext": "BBBB",
        }));
    }
}
