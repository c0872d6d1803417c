//! A local HTTPS mock of the Azure Key Vault REST API (wrapkey/unwrapkey,
//! get key, list versions (paged by `nextLink`), rotate; with the bearer
//! challenge flow).
//!
//! The mock holds real keys (AES-256-GCM per key version standing in for the
//! vault's RSA keys: the client never sees the difference), so round trips are
//! real, and it records every request so tests can assert what the SDK sends.
//!
//! The vault's host name is [`HOST`], resolved to the mock's loopback address
//! by the provider's HTTP client; the mock's TLS certificate is issued for
//! that name by a CA the client trusts. The SDK's challenge resource
//! verification stays on (resource [`CHALLENGE_RESOURCE`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::http::Transport;
use azure_security_keyvault_keys::KeyClientOptions;
use base64::Engine;
use kmsfs::kms::azure::{AzureConfig, AzureKms};
use rand::RngCore;

pub use super::http_mock::Mode;
use super::http_mock::{MockServer, Req, Resp};

pub const HOST: &str = "kmsfs.vault.localhost";
pub const CHALLENGE_RESOURCE: &str = "https://vault.localhost";
pub const TOKEN: &str = "test-bearer-token-0123456789";
pub const API_VERSION: &str = "2025-07-01";
pub const KEY: &str = "kek";
pub const V1: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
pub const V2: &str = "f9e8d7c6b5a4938271605f4e3d2c1b0a";
pub const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// When the mock's versions were created: the first at `CREATED_BASE`,
/// each later one `CREATED_STEP` seconds after the one before.
pub const CREATED_BASE: i64 = 1_700_000_000;
pub const CREATED_STEP: i64 = 100;
/// Versions per page of `GET /keys/NAME/versions`.
pub const VERSIONS_PAGE: usize = 2;

struct State {
    mode: Mode,
    keys: HashMap<String, [u8; 32]>,
    latest: String,
    /// Versions, oldest first.
    order: Vec<String>,
    disabled: HashSet<String>,
}

impl State {
    fn add_version(&mut self, version: String) {
        self.keys
            .insert(version.clone(), rand::random::<[u8; 32]>());
        self.latest = version.clone();
        self.order.push(version);
    }

    fn created(&self, version: &str) -> i64 {
        let i = self.order.iter().position(|v| v == version).unwrap_or(0);
        CREATED_BASE + CREATED_STEP * i as i64
    }

    /// A key bundle (`GET /keys/NAME/VERSION`, rotate) or a key item (the
    /// versions listing) of `version`.
    fn bundle(&self, host: &str, version: &str, item: bool) -> serde_json::Value {
        let kid = format!("https://{host}/keys/{KEY}/{version}");
        let created = self.created(version);
        let attributes = serde_json::json!({
            "enabled": !self.disabled.contains(version),
            "created": created,
            "updated": created,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90
        });
        if item {
            serde_json::json!({"kid": kid, "attributes": attributes})
        } else {
            serde_json::json!({
                "key": {"kid": kid, "kty": "RSA", "key_ops": ["wrapKey", "unwrapKey"],
                        "n": B64URL.encode([0xc5u8; 256]), "e": "AQAB"},
                "attributes": attributes
            })
        }
    }
}

pub struct Mock {
    pub server: MockServer,
    state: Arc<Mutex<State>>,
}

impl Mock {
    pub async fn start() -> Mock {
        let mut state = State {
            mode: Mode::Normal,
            keys: HashMap::new(),
            latest: String::new(),
            order: Vec::new(),
            disabled: HashSet::new(),
        };
        state.add_version(V1.to_string());
        let state = Arc::new(Mutex::new(state));
        let st = state.clone();
        let server = MockServer::https(HOST, Arc::new(move |req: &Req| handle(req, &st))).await;
        Mock { server, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub fn vault_url(&self) -> String {
        format!("https://{HOST}:{}", self.addr().port())
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// A new key version becomes the latest.
    pub fn rotate(&self) {
        self.state.lock().unwrap().add_version(V2.to_string());
    }

    /// The key's versions, oldest first.
    pub fn versions(&self) -> Vec<String> {
        self.state.lock().unwrap().order.clone()
    }

    /// Disables a version: it is listed as not enabled, and neither wraps
    /// nor unwraps.
    pub fn disable(&self, version: &str) {
        self.state
            .lock()
            .unwrap()
            .disabled
            .insert(version.to_string());
    }

    pub fn requests(&self) -> Vec<Req> {
        self.server.requests()
    }

    pub fn clear(&self) {
        self.server.clear();
    }

    pub fn cfg(&self, version: Option<&str>, timeout_secs: u64) -> AzureConfig {
        AzureConfig {
            vault_url: self.vault_url(),
            key_name: KEY.into(),
            key_version: version.map(str::to_owned),
            timeout_secs,
        }
    }

    /// The provider, talking to `addr` through a client that resolves HOST
    /// there and trusts only the mock's CA.
    pub fn kms_with(
        &self, cfg: &AzureConfig, addr: SocketAddr, cred: Arc<FakeCredential>,
    ) -> AzureKms {
        let ca = self.server.ca_der.as_ref().expect("an HTTPS mock");
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_der(ca).unwrap()])
            .resolve(HOST, addr)
            .no_proxy()
            .build()
            .unwrap();
        let mut options = KeyClientOptions::default();
        options.client_options.transport = Some(Transport::new(Arc::new(http)));
        AzureKms::with_credential(cfg, cred, Some(options)).unwrap()
    }

    pub fn kms(&self, version: Option<&str>) -> (AzureKms, Arc<FakeCredential>) {
        let cred = Arc::new(FakeCredential::default());
        (
            self.kms_with(&self.cfg(version, 10), self.addr(), cred.clone()),
            cred,
        )
    }
}

fn error_resp(status: u16, code: &str, message: &str) -> Resp {
    Resp::json(
        status,
        serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

/// `resp` with the bearer challenge that names the token's resource.
fn challenge(mut resp: Resp) -> Resp {
    resp.headers.push((
        "www-authenticate".into(),
        format!("Bearer authorization=\"https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000\", resource=\"{CHALLENGE_RESOURCE}\""),
    ));
    resp
}

/// The Key Vault REST semantics the provider relies on.
fn handle(req: &Req, st: &Mutex<State>) -> Resp {
    let mode = st.lock().unwrap().mode;
    match req.header("authorization") {
        None => {
            return challenge(error_resp(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
            ));
        }
        Some(a) if a != format!("Bearer {TOKEN}") || mode == Mode::Reject401 => {
            return challenge(error_resp(401, "Unauthorized", "AKV10032: Invalid issuer."));
        }
        Some(_) => {}
    }
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    if let ["keys", name, what] = segs[..] {
        return handle_key(req, st, mode, name, what);
    }
    if req.method != "POST" {
        return error_resp(405, "MethodNotAllowed", "only POST here");
    }
    let [keys_lit, name, version, op] = segs[..] else {
        return error_resp(400, "BadParameter", "unexpected path");
    };
    if keys_lit != "keys" || !(op == "wrapkey" || op == "unwrapkey") {
        return error_resp(400, "BadParameter", "unexpected path");
    }
    let op_name = if op == "wrapkey" {
        "wrapKey"
    } else {
        "unwrapKey"
    };
    if name != KEY {
        return error_resp(
            404,
            "KeyNotFound",
            &format!("A key with (name/id) {name} was not found in this key vault."),
        );
    }
    match mode {
        Mode::Deny403 => {
            return Resp::json(
                403,
                serde_json::json!({"error": {
                    "code": "Forbidden",
                    "message": format!("The user, group or application 'appid=11111111-2222-3333-4444-555555555555' does not have keys {} permission on key vault 'kmsfs;location=westeurope'.", op_name.to_ascii_lowercase()),
                    "innererror": {"code": "AccessDenied"}
                }}),
            )
        }
        Mode::Disabled => {
            return error_resp(
                403,
                "Forbidden",
                &format!("Operation {op_name} is not allowed on a disabled key."),
            )
        }
        _ => {}
    }
    let body: serde_json::Value = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(_) => return error_resp(400, "BadParameter", "body is not JSON"),
    };
    if body["alg"] != "RSA-OAEP-256" {
        return error_resp(400, "BadParameter", "Invalid algorithm.");
    }
    let Some(value) = body["value"].as_str().and_then(|v| B64URL.decode(v).ok()) else {
        return error_resp(400, "BadParameter", "value is not base64url");
    };
    let g = st.lock().unwrap();
    let version = if version.is_empty() {
        g.latest.clone()
    } else {
        version.to_string()
    };
    let Some(k) = g.keys.get(&version) else {
        return error_resp(
            404,
            "KeyNotFound",
            &format!("A key with (name/id) {name}/{version} was not found."),
        );
    };
    if g.disabled.contains(&version) {
        return error_resp(
            403,
            "Forbidden",
            &format!("Operation {op_name} is not allowed on a disabled key."),
        );
    }
    let cipher = Aes256Gcm::new_from_slice(k).unwrap();
    let host = req.headers.get("host").cloned().unwrap_or_default();
    let kid = format!("https://{host}/keys/{name}/{version}");
    let out = if op == "wrapkey" {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        out.extend(
            cipher
                .encrypt(Nonce::from_slice(&nonce), &value[..])
                .unwrap(),
        );
        out
    } else {
        if value.len() < 12 + 16 {
            return error_resp(400, "BadParameter", "Unwrap failed.");
        }
        match cipher.decrypt(Nonce::from_slice(&value[..12]), &value[12..]) {
            Ok(p) => p,
            Err(_) => return error_resp(400, "BadParameter", "Unwrap failed."),
        }
    };
    Resp::json(
        200,
        serde_json::json!({"kid": kid, "value": B64URL.encode(out)}),
    )
}

/// The key's metadata calls (authorized already): `GET /keys/NAME/` (the
/// latest version), `GET /keys/NAME/versions` (newest first,
/// [`VERSIONS_PAGE`] a page, `$skiptoken` in `nextLink`) and `POST
/// /keys/NAME/rotate` (a new latest version).
fn handle_key(req: &Req, st: &Mutex<State>, mode: Mode, name: &str, what: &str) -> Resp {
    let (permission, method) = match what {
        "" => ("get", "GET"),
        "versions" => ("list", "GET"),
        "rotate" => ("rotate", "POST"),
        _ => return error_resp(400, "BadParameter", "unexpected path"),
    };
    if req.method != method {
        return error_resp(405, "MethodNotAllowed", "unexpected method");
    }
    if name != KEY {
        return error_resp(
            404,
            "KeyNotFound",
            &format!("A key with (name/id) {name} was not found in this key vault."),
        );
    }
    match mode {
        Mode::Deny403 => {
            return Resp::json(
                403,
                serde_json::json!({"error": {
                    "code": "Forbidden",
                    "message": format!("The user, group or application 'appid=11111111-2222-3333-4444-555555555555' does not have keys {permission} permission on key vault 'kmsfs;location=westeurope'."),
                    "innererror": {"code": "AccessDenied"}
                }}),
            )
        }
        Mode::Disabled if what == "rotate" => {
            return error_resp(
                403,
                "Forbidden",
                "Operation rotate is not allowed on a disabled key.",
            )
        }
        _ => {}
    }
    let host = req.headers.get("host").cloned().unwrap_or_default();
    let mut g = st.lock().unwrap();
    match what {
        "" => Resp::json(200, g.bundle(&host, &g.latest, false)),
        "rotate" => {
            let version = hex::encode(rand::random::<[u8; 16]>());
            g.add_version(version.clone());
            Resp::json(200, g.bundle(&host, &version, false))
        }
        _ => {
            let skip: usize = req
                .param("$skiptoken")
                .map(|t| t.parse().expect("a skiptoken of ours"))
                .unwrap_or(0);
            let newest_first: Vec<&String> = g.order.iter().rev().collect();
            let page: Vec<serde_json::Value> = newest_first
                .iter()
                .skip(skip)
                .take(VERSIONS_PAGE)
                .map(|v| g.bundle(&host, v, true))
                .collect();
            let next = skip + VERSIONS_PAGE;
            let next_link = (next < newest_first.len()).then(|| {
                format!(
                    "https://{host}/keys/{KEY}/versions?api-version={API_VERSION}&$skiptoken={next}&maxresults={VERSIONS_PAGE}"
                )
            });
            Resp::json(
                200,
                serde_json::json!({"value": page, "nextLink": next_link}),
            )
        }
    }
}

/// Hands out TOKEN and records the scopes it was asked for.
#[derive(Debug, Default)]
pub struct FakeCredential {
    pub scopes: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl TokenCredential for FakeCredential {
    async fn get_token(
        &self, scopes: &[&str], _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.scopes
            .lock()
            .unwrap()
            .extend(scopes.iter().map(|s| s.to_string()));
        Ok(AccessToken {
            token: Secret::new(TOKEN.to_string()),
            expires_on: azure_core::time::OffsetDateTime::now_utc()
                + azure_core::time::Duration::hours(1),
        })
    }
}
