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
//! vaultrs has no `batch_input`. Every request is bounded by
//! `timeout_secs`. Tokens, secret IDs and JWTs never appear in logs or errors.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use zeroize::Zeroizing;

use super::{KeyProvider, KeyRef, KmsError, WrapContext, WrappedDek};
use crate::crypto::Dek;

const PROVIDER: &str = "vault";

/// Most items per `batch_input` request.
pub const BATCH_MAX: usize = 250;
/// OpenBao refuses JSON requests with more than 1000 strings (listener
/// `max_request_json_strings`), counting object keys; each batch item has 4
/// (ciphertext, associated_data) or 6 (plus context). Stay below with margin.
const JSON_STRINGS_BUDGET: usize = 960;

fn default_mount() -> String {
    "transit".into()
}

/// How to log in to Vault. Secrets are never stored in the configuration:
/// the token comes from VAULT_TOKEN, an AppRole secret ID from a file or
/// VAULT_SECRET_ID, a Kubernetes service-account JWT from a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum VaultAuth {
    #[default]
    Token,
    Approle {
        role_id: String,
        /// File holding the secret ID; VAULT_SECRET_ID when absent.
        #[serde(default)]
        secret_id_file: Option<PathBuf>,
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
    Kubernetes {
        role: String,
        #[serde(default = "default_jwt_file")]
        jwt_file: PathBuf,
        #[serde(default = "default_kubernetes_mount")]
        mount: String,
    },
}

fn default_approle_mount() -> String {
    "approle".into()
}
fn default_kubernetes_mount() -> String {
    "kubernetes".into()
}
fn default_jwt_file() -> PathBuf {
    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// e.g. https://vault.example:8200
    pub address: String,
    /// Transit secrets engine mount path.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Transit key name.
    pub key: String,
    /// Vault Enterprise namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub auth: VaultAuth,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Skip TLS verification (prints a warning; for tests only).
    #[serde(default)]
    pub skip_verify: bool,
    #[serde(default = "super::default_timeout_secs")]
    pub timeout_secs: u64,
}

/// The operation a request performs, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
    ReadKey,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "transit encrypt",
            Op::Decrypt => "transit decrypt",
            Op::ReadKey => "transit keys read",
        }
    }
}

/// The Vault token in use, and when a login token should be renewed.
struct TokenState {
    token: Arc<Zeroizing<String>>,
    /// For AppRole/Kubernetes logins: log in again after this instant.
    refresh_at: Option<Instant>,
}

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
    timeout: Duration,
    /// Token given by the embedder instead of VAULT_TOKEN.
    token_override: Option<Zeroizing<String>>,
}

/// The JSON answer of one request.
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn errors(&self) -> String {
        match self.body.get("errors").and_then(Value::as_array) {
            Some(a) if !a.is_empty() => a
                .iter()
                .filter_map(Value::as_str)
                .map(|s| {
                    s.replace("\n\t* ", " ")
                        .replace("\n", " ")
                        .trim()
                        .to_owned()
                })
                .collect::<Vec<_>>()
                .join("; "),
            _ => String::new(),
        }
    }
}

fn kms_name(cfg: &VaultConfig) -> String {
    format!("Vault at {}", cfg.address.trim_end_matches('/'))
}

/// A transport error's message with its causes, for Unreachable details.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Whether any cause in the chain is an I/O timeout.
fn chain_is_timeout(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(s) = cur {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = s.source();
    }
    false
}

impl VaultKms {
    /// Builds the client, logs in and reads the transit key (which proves
    /// reachability, credentials and the key's existence, and tells whether
    /// the key is derived).
    pub async fn connect(cfg: &VaultConfig) -> Result<Arc<dyn KeyProvider>, KmsError> {
        Ok(Arc::new(Self::connect_concrete(cfg).await?))
    }

    /// [`connect`](Self::connect) returning the concrete type.
    pub async fn connect_concrete(cfg: &VaultConfig) -> Result<Self, KmsError> {
        Self::connect_inner(cfg, None).await
    }

    /// Like [`connect`](Self::connect) with token auth, but with `token`
    /// instead of VAULT_TOKEN (for embedding and tests; `cfg.auth` is ignored).
    pub async fn connect_with_token(cfg: &VaultConfig, token: &str) -> Result<Self, KmsError> {
        Self::connect_inner(cfg, Some(Zeroizing::new(token.to_owned()))).await
    }

    async fn connect_inner(
        cfg: &VaultConfig,
        token: Option<Zeroizing<String>>,
    ) -> Result<Self, KmsError> {
        let mut cfg = cfg.clone();
        if token.is_some() {
            cfg.auth = VaultAuth::Token;
        }
        let cfg = &cfg;
        let client = build_client(cfg)?;
        let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
        let mut kms = VaultKms {
            cfg: cfg.clone(),
            client,
            base: cfg.address.trim_end_matches('/').to_owned(),
            token: RwLock::new(TokenState {
                token: Arc::new(Zeroizing::new(String::new())),
                refresh_at: None,
            }),
            login_lock: tokio::sync::Mutex::new(()),
            derived: false,
            timeout,
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
                kms_name(cfg),
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
        kms_name(&self.cfg)
    }

    fn key_id(&self) -> String {
        format!("{}/{}", self.cfg.mount.trim_matches('/'), self.cfg.key)
    }

    fn current_token(&self) -> (Arc<Zeroizing<String>>, bool) {
        let st = self.token.read().unwrap();
        let stale = st.refresh_at.is_some_and(|t| Instant::now() >= t);
        (st.token.clone(), stale)
    }

    /// Obtains a token by the configured method.
    async fn login(&self) -> Result<TokenState, KmsError> {
        let auth_failed = |detail: String| KmsError::AuthFailed {
            kms: self.kms(),
            detail,
        };
        match &self.cfg.auth {
            VaultAuth::Token if self.token_override.is_some() => Ok(TokenState {
                token: Arc::new(self.token_override.clone().expect("checked")),
                refresh_at: None,
            }),
            VaultAuth::Token => match std::env::var("VAULT_TOKEN") {
                Ok(t) if !t.trim().is_empty() => Ok(TokenState {
                    token: Arc::new(Zeroizing::new(t.trim().to_owned())),
                    refresh_at: None,
                }),
                _ => Err(KmsError::Config(format!(
                    "the vault provider (auth method token) reads its token from the VAULT_TOKEN \
                     environment variable, which is not set; set it for `kmsfs mount` ({})",
                    self.kms()
                ))),
            },
            VaultAuth::Approle {
                role_id,
                secret_id_file,
                mount,
            } => {
                let secret_id = match secret_id_file {
                    Some(f) => Zeroizing::new(
                        std::fs::read_to_string(f)
                            .map_err(|e| {
                                KmsError::Config(format!(
                                    "cannot read the AppRole secret ID file {}: {e}",
                                    f.display()
                                ))
                            })?
                            .trim()
                            .to_owned(),
                    ),
                    None => match std::env::var("VAULT_SECRET_ID") {
                        Ok(s) if !s.trim().is_empty() => Zeroizing::new(s.trim().to_owned()),
                        _ => return Err(KmsError::Config(
                            "AppRole login needs a secret ID: set VAULT_SECRET_ID or configure \
                                 secret_id_file (--vault-secret-id-file)"
                                .into(),
                        )),
                    },
                };
                let r = self
                    .bounded(vaultrs::auth::approle::login(
                        &self.client,
                        mount,
                        role_id,
                        &secret_id,
                    ))
                    .await?;
                self.login_result(r, &format!("AppRole login at auth/{mount}"), auth_failed)
            }
            VaultAuth::Kubernetes {
                role,
                jwt_file,
                mount,
            } => {
                let jwt = Zeroizing::new(
                    std::fs::read_to_string(jwt_file)
                        .map_err(|e| {
                            KmsError::Config(format!(
                                "cannot read the Kubernetes service-account token {}: {e}",
                                jwt_file.display()
                            ))
                        })?
                        .trim()
                        .to_owned(),
                );
                let r = self
                    .bounded(vaultrs::auth::kubernetes::login(
                        &self.client,
                        mount,
                        role,
                        &jwt,
                    ))
                    .await?;
                self.login_result(
                    r,
                    &format!("Kubernetes login at auth/{mount} as role {role}"),
                    auth_failed,
                )
            }
        }
    }

    fn login_result(
        &self,
        r: Result<vaultrs::api::AuthInfo, vaultrs::error::ClientError>,
        what: &str,
        auth_failed: impl Fn(String) -> KmsError,
    ) -> Result<TokenState, KmsError> {
        use vaultrs::error::ClientError as CE;
        match r {
            Ok(info) => {
                let refresh_at = (info.lease_duration > 0)
                    .then(|| Instant::now() + Duration::from_secs(info.lease_duration * 3 / 4));
                Ok(TokenState {
                    token: Arc::new(Zeroizing::new(info.client_token)),
                    refresh_at,
                })
            }
            Err(CE::APIError { code, errors }) if code < 500 => Err(auth_failed(format!(
                "{what} failed: HTTP {code}: {}",
                errors.join("; ")
            ))),
            Err(CE::APIError { code, errors }) => Err(KmsError::Unreachable {
                kms: self.kms(),
                detail: format!("{what} failed: HTTP {code}: {}", errors.join("; ")),
            }),
            Err(CE::RestClientError { source }) => Err(self.transport_error(&source)),
            Err(e) => Err(auth_failed(format!("{what} failed: {}", error_chain(&e)))),
        }
    }

    /// Logs in again (AppRole/Kubernetes) unless another task just did.
    async fn relogin(&self, stale: &Arc<Zeroizing<String>>) -> Result<(), KmsError> {
        let _g = self.login_lock.lock().await;
        if !Arc::ptr_eq(&self.token.read().unwrap().token, stale) {
            return Ok(());
        }
        let st = self.login().await?;
        *self.token.write().unwrap() = st;
        Ok(())
    }

    fn uses_login(&self) -> bool {
        !matches!(self.cfg.auth, VaultAuth::Token)
    }

    /// Runs `f` bounded by the configured timeout.
    async fn bounded<F: std::future::Future>(&self, f: F) -> Result<F::Output, KmsError> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| KmsError::Timeout {
                kms: self.kms(),
                seconds: self.timeout.as_secs(),
            })
    }

    fn transport_error(&self, e: &(dyn StdError + 'static)) -> KmsError {
        if chain_is_timeout(e) {
            return KmsError::Timeout {
                kms: self.kms(),
                seconds: self.timeout.as_secs(),
            };
        }
        KmsError::Unreachable {
            kms: self.kms(),
            detail: error_chain(e),
        }
    }

    /// One HTTP request with `token`; `body` None = GET.
    async fn send(
        &self,
        path: &str,
        body: Option<&Value>,
        token: &str,
    ) -> Result<Answer, KmsError> {
        let url = format!("{}/v1/{}", self.base, path);
        let http = &self.client.http.http;
        let mut rb = match body {
            None => http.get(&url),
            Some(b) => http
                .post(&url)
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(b).expect("JSON serializes")),
        };
        rb = rb
            .header("X-Vault-Token", token)
            .header("X-Vault-Request", "true");
        if let Some(ns) = self.cfg.namespace.as_deref().filter(|n| !n.is_empty()) {
            rb = rb.header("X-Vault-Namespace", ns);
        }
        let fut = async move {
            // (Spelled out without `?`: reqwest is not a direct dependency,
            // so its error type cannot be named.)
            match rb.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match resp.bytes().await {
                        Ok(bytes) => Ok((status, Zeroizing::new(bytes.to_vec()))),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        };
        let (status, bytes) = self
            .bounded(fut)
            .await?
            .map_err(|e| self.transport_error(&e))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(_) if status >= 500 || status == 429 => Value::Null,
                Err(_) => {
                    return Err(KmsError::Unreachable {
                        kms: self.kms(),
                        detail: format!(
                        "HTTP {status} with a body that is not JSON: is {} a Vault/OpenBao server?",
                        self.base
                    ),
                    })
                }
            }
        };
        Ok(Answer { status, body })
    }

    /// A request with the current token; on a rejected login token, logs in
    /// again once (AppRole/Kubernetes). Returns the answer and whether the
    /// token was found invalid (403 and lookup-self fails too).
    async fn request(&self, path: &str, body: Option<&Value>) -> Result<Answer, KmsError> {
        let (token, stale) = self.current_token();
        let token = if stale {
            self.relogin(&token).await?;
            self.current_token().0
        } else {
            token
        };
        let ans = self.send(path, body, &token).await?;
        if ans.status == 403 && self.uses_login() && !self.token_valid(&token).await? {
            self.relogin(&token).await?;
            let token = self.current_token().0;
            return self.send(path, body, &token).await;
        }
        Ok(ans)
    }

    /// Whether `token` is valid (lookup-self, allowed by Vault's default policy).
    async fn token_valid(&self, token: &str) -> Result<bool, KmsError> {
        let ans = self.send("auth/token/lookup-self", None, token).await?;
        Ok(ans.status != 403 && ans.status != 401)
    }

    /// Classifies a non-2xx answer to `op` with no per-item results.
    async fn classify(&self, op: Op, ans: &Answer, version: Option<&str>) -> KmsError {
        let errors = ans.errors();
        let detail = if errors.is_empty() {
            format!("HTTP {}", ans.status)
        } else {
            format!("HTTP {}: {errors}", ans.status)
        };
        match ans.status {
            401 | 403 => {
                let token = self.current_token().0;
                match self.token_valid(&token).await {
                    Ok(false) => KmsError::AuthFailed {
                        kms: self.kms(),
                        detail: format!("the token is invalid or expired ({detail})"),
                    },
                    _ => KmsError::PermissionDenied {
                        kms: self.kms(),
                        operation: op.name(),
                        detail: format!("{detail} on {}", self.op_path(op)),
                    },
                }
            }
            404 if op == Op::ReadKey => KmsError::KeyNotFound {
                kms: self.kms(),
                key: self.key_id(),
            },
            429 | 500..=599 => KmsError::Unreachable {
                kms: self.kms(),
                detail: format!("{} failed: {detail}", op.name()),
            },
            _ => self.classify_message(op, &errors, &detail, version),
        }
    }

    /// Classifies a transit error message (whole request or one batch item).
    fn classify_message(&self, op: Op, msg: &str, detail: &str, version: Option<&str>) -> KmsError {
        let m = msg.to_ascii_lowercase();
        if m.contains("key not found")
            || m.contains("no existing key named")
            || m.contains("unsupported path")
        {
            KmsError::KeyNotFound {
                kms: self.kms(),
                key: self.key_id(),
            }
        } else if m.contains("disallowed by policy")
            || m.contains("too old")
            || m.contains("min_decryption_version")
            || m.contains("minimum decryption version")
        {
            KmsError::KeyVersionUnusable {
                kms: self.kms(),
                key: self.key_id(),
                version: version.unwrap_or("?").to_owned(),
                detail: format!(
                    "{detail} (the key's min_decryption_version excludes it; lower it or rewrap the file)"
                ),
            }
        } else if m.contains("high complexity") || m.contains("maximum number of strings") {
            KmsError::Config(format!(
                "{}: the server refused a {} request as too large ({detail}); \
                 its listener limits (max_request_json_strings) are below kmsfs's batches",
                self.kms(),
                op.name()
            ))
        } else if m.contains("context") && m.contains("deriv") {
            KmsError::Config(format!(
                "{}: transit key {} needs a derivation context ({detail}); \
                 its derived setting changed since kmsfs connected, remount",
                self.kms(),
                self.key_id()
            ))
        } else if op == Op::Decrypt {
            KmsError::UnwrapFailed {
                kms: self.kms(),
                detail: format!("{} failed: {detail}", op.name()),
            }
        } else {
            KmsError::Config(format!("{}: {} failed: {detail}", self.kms(), op.name()))
        }
    }

    fn op_path(&self, op: Op) -> String {
        let m = self.cfg.mount.trim_matches('/');
        let k = &self.cfg.key;
        match op {
            Op::Encrypt => format!("{m}/encrypt/{k}"),
            Op::Decrypt => format!("{m}/decrypt/{k}"),
            Op::ReadKey => format!("{m}/keys/{k}"),
        }
    }

    /// Reads the key's metadata; checks it is usable for kmsfs.
    async fn read_key(&self) -> Result<KeyFacts, KmsError> {
        let ans = self.request(&self.op_path(Op::ReadKey), None).await?;
        if !(200..300).contains(&ans.status) {
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
        if !self.handles(&wrapped.key_ref) {
            return Err(KmsError::NoProvider {
                provider: wrapped.key_ref.provider.clone(),
                key: wrapped.key_ref.key_id.clone(),
            });
        }
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

    fn dek_from_b64(&self, b64: &str) -> Result<Dek, KmsError> {
        let mut raw = Zeroizing::new(Vec::with_capacity(48));
        B64.decode_vec(b64, &mut raw)
            .map_err(|_| KmsError::UnwrapFailed {
                kms: self.kms(),
                detail: "transit decrypt returned a plaintext that is not base64".into(),
            })?;
        Dek::from_slice(&raw).map_err(|e| KmsError::UnwrapFailed {
            kms: self.kms(),
            detail: format!("transit decrypt returned a plaintext that is not a DEK: {e}"),
        })
    }

    /// One batch decrypt request of at most BATCH_MAX prepared items.
    async fn decrypt_chunk(
        &self,
        items: &[(&str, String, &WrapContext)],
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
            let e = if (200..300).contains(&ans.status) {
                KmsError::UnwrapFailed {
                    kms: self.kms(),
                    detail: "transit decrypt returned no batch_results of the right length".into(),
                }
            } else {
                self.classify(Op::Decrypt, &ans, None).await
            };
            return items.iter().map(|_| Err(e.clone())).collect();
        };
        results
            .iter()
            .zip(items)
            .map(|(r, (_, version, _))| {
                let err = r["error"].as_str().unwrap_or("");
                if !err.is_empty() {
                    let detail = format!("HTTP {}: {err}", ans.status);
                    return Err(self.classify_message(Op::Decrypt, err, &detail, Some(version)));
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

fn build_client(cfg: &VaultConfig) -> Result<VaultClient, KmsError> {
    let addr = cfg.address.trim_end_matches('/');
    if !(addr.starts_with("http://") || addr.starts_with("https://"))
        || addr.len() <= "https://".len()
    {
        return Err(KmsError::Config(format!(
            "vault address {:?} must be an http:// or https:// URL, e.g. https://vault.example:8200",
            cfg.address
        )));
    }
    if cfg.key.is_empty() || cfg.key.contains('/') || cfg.mount.trim_matches('/').is_empty() {
        return Err(KmsError::Config(format!(
            "vault transit mount {:?} / key {:?}: both must be non-empty and the key must not contain '/'",
            cfg.mount, cfg.key
        )));
    }
    if cfg.skip_verify {
        tracing::warn!(
            "vault: TLS certificate verification of {addr} is OFF (skip_verify); \
             anyone on the network path can impersonate Vault. Use only for tests"
        );
    }
    match url::Url::parse(addr) {
        Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {}
        _ => {
            return Err(KmsError::Config(format!(
                "vault address {:?} is not a valid URL",
                cfg.address
            )))
        }
    }
    if let Some(ca) = &cfg.ca_cert {
        let pem = std::fs::read(ca).map_err(|e| {
            KmsError::Config(format!(
                "cannot read the vault CA certificate {}: {e}",
                ca.display()
            ))
        })?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(KmsError::Config(format!(
                "the vault CA certificate {} holds no PEM certificate",
                ca.display()
            )));
        }
    }
    let mut b = VaultClientSettingsBuilder::default();
    // Validated above: the builder's setter panics on a malformed URL.
    b.address(addr);
    b.token("")
        .verify(!cfg.skip_verify)
        .timeout(Some(Duration::from_secs(cfg.timeout_secs.max(1) + 5)))
        .ca_certs(
            cfg.ca_cert
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        )
        .namespace(cfg.namespace.clone().filter(|n| !n.is_empty()));
    let identity = match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p)
                    .map_err(|e| KmsError::Config(format!("cannot read {}: {e}", p.display())))
            };
            let mut pem = Zeroizing::new(read(c)?);
            pem.push(b'\n');
            pem.extend_from_slice(&Zeroizing::new(read(k)?));
            Some(vaultrs::client::Identity::from_pem(&pem).map_err(|e| {
                KmsError::Config(format!(
                    "client certificate {} / key {}: {e} (both must be PEM)",
                    c.display(),
                    k.display()
                ))
            })?)
        }
        _ => {
            return Err(KmsError::Config(
                "vault client_cert and client_key must be given together".into(),
            ))
        }
    };
    b.identity(identity);
    let settings = b
        .build()
        .map_err(|e| KmsError::Config(format!("vault client settings: {e}")))?;
    VaultClient::new(settings)
        .map_err(|e| KmsError::Config(format!("vault client: {}", error_chain(&e))))
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
        if !(200..300).contains(&ans.status) {
            return Err(self.classify(Op::Encrypt, &ans, None).await);
        }
        let ct = ans.body["data"]["ciphertext"].as_str().unwrap_or("");
        let version = ciphertext_version(ct).ok_or_else(|| {
            KmsError::Config(format!(
                "{}: transit encrypt returned no `vault:vN:` ciphertext",
                self.kms()
            ))
        })?;
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
        if !(200..300).contains(&ans.status) {
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

    #[test]
    fn config_errors_are_clear() {
        let mut cfg = VaultConfig {
            address: "vault.example:8200".into(),
            mount: "transit".into(),
            key: "k".into(),
            namespace: None,
            auth: VaultAuth::Token,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            skip_verify: false,
            timeout_secs: 10,
        };
        let e = build_client(&cfg).err().unwrap().to_string();
        assert!(e.contains("http:// or https://"), "{e}");
        cfg.address = "http://[::1".into();
        let e = build_client(&cfg).err().unwrap().to_string();
        assert!(e.contains("not a valid URL"), "{e}");
        cfg.address = "http://127.0.0.1:1".into();
        cfg.client_cert = Some("/nonexistent".into());
        let e = build_client(&cfg).err().unwrap().to_string();
        assert!(e.contains("together"), "{e}");
    }
}
