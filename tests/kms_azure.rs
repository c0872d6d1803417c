//! The Azure Key Vault provider against a local HTTPS mock of the Key Vault
//! REST API (wrapkey/unwrapkey, with the bearer challenge flow).
//!
//! The mock holds real keys (AES-256-GCM per key version standing in for the
//! vault's RSA keys: the client never sees the difference), so round trips are
//! real, and it records every request so the tests can assert what the SDK
//! sends: method, path, api-version, alg, body and Authorization header.
//!
//! The vault's host name is `kmsfs.vault.localhost`, resolved to the mock's
//! loopback address by the test's HTTP client; the mock's TLS certificate is
//! issued for that name by a CA the client trusts. The SDK's challenge
//! resource verification stays on (resource `https://vault.localhost`).
#![cfg(feature = "azure")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::http::Transport;
use azure_security_keyvault_keys::KeyClientOptions;
use base64::Engine;
use kmsfs::crypto::Dek;
use kmsfs::kms::azure::{AzureConfig, AzureKms};
use kmsfs::kms::{KeyProvider, KeyRef, KmsError, WrapContext};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const HOST: &str = "kmsfs.vault.localhost";
const CHALLENGE_RESOURCE: &str = "https://vault.localhost";
const TOKEN: &str = "test-bearer-token-0123456789";
const API_VERSION: &str = "2025-07-01";
const KEY: &str = "kek";
const V1: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
const V2: &str = "f9e8d7c6b5a4938271605f4e3d2c1b0a";
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Req {
    fn auth(&self) -> Option<&str> {
        self.headers.get("authorization").map(String::as_str)
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON request body")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Normal,
    Reject401,
    Deny403,
    Disabled403,
    Hang,
}

struct State {
    mode: Mode,
    requests: Vec<Req>,
    keys: HashMap<String, [u8; 32]>,
    latest: String,
}

struct Mock {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    ca_der: Vec<u8>,
}

impl Mock {
    async fn start() -> Mock {
        // A CA and a server certificate for HOST, issued by it.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kmsfs test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![HOST.to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let tls = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(
                    leaf_key.serialize_der().into(),
                ),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let mut keys = HashMap::new();
        keys.insert(V1.to_string(), rand::random::<[u8; 32]>());
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Normal,
            requests: Vec::new(),
            keys,
            latest: V1.to_string(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, st).await;
                    }
                });
            }
        });
        Mock {
            addr,
            state,
            ca_der: ca.der().to_vec(),
        }
    }

    fn vault_url(&self) -> String {
        format!("https://{HOST}:{}", self.addr.port())
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn rotate(&self) {
        let mut s = self.state.lock().unwrap();
        s.keys.insert(V2.to_string(), rand::random::<[u8; 32]>());
        s.latest = V2.to_string();
    }

    fn requests(&self) -> Vec<Req> {
        self.state.lock().unwrap().requests.clone()
    }

    fn clear(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    fn cfg(&self, version: Option<&str>, timeout_secs: u64) -> AzureConfig {
        AzureConfig {
            vault_url: self.vault_url(),
            key_name: KEY.into(),
            key_version: version.map(str::to_owned),
            timeout_secs,
        }
    }

    /// The provider, talking to this mock through a client that resolves
    /// HOST to the mock and trusts only the mock's CA.
    fn kms_with(&self, cfg: &AzureConfig, addr: SocketAddr, cred: Arc<FakeCredential>) -> AzureKms {
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_der(&self.ca_der).unwrap()])
            .resolve(HOST, addr)
            .no_proxy()
            .build()
            .unwrap();
        let mut options = KeyClientOptions::default();
        options.client_options.transport = Some(Transport::new(Arc::new(http)));
        AzureKms::with_credential(cfg, cred, Some(options)).unwrap()
    }

    fn kms(&self, version: Option<&str>) -> (AzureKms, Arc<FakeCredential>) {
        let cred = Arc::new(FakeCredential::default());
        (
            self.kms_with(&self.cfg(version, 10), self.addr, cred.clone()),
            cred,
        )
    }
}

/// Reads one HTTP/1.1 request (headers, Content-Length body).
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<Req> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let mut headers = HashMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers
        .get("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    Some(Req {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

struct Resp {
    status: u16,
    body: String,
    challenge: bool,
}

fn json_resp(status: u16, body: serde_json::Value) -> Resp {
    Resp {
        status,
        body: body.to_string(),
        challenge: false,
    }
}

fn error_resp(status: u16, code: &str, message: &str) -> Resp {
    json_resp(
        status,
        serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, st: Arc<Mutex<State>>) {
    let Some(req) = read_request(&mut s).await else {
        return;
    };
    let mode = {
        let mut g = st.lock().unwrap();
        g.requests.push(req.clone());
        g.mode
    };
    if mode == Mode::Hang {
        tokio::time::sleep(Duration::from_secs(60)).await;
        return;
    }
    let resp = handle(&req, mode, &st);
    let reason = match resp.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Other",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n",
        resp.status,
        resp.body.len()
    );
    if resp.challenge {
        out.push_str(&format!(
            "www-authenticate: Bearer authorization=\"https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000\", resource=\"{CHALLENGE_RESOURCE}\"\r\n"
        ));
    }
    out.push_str("\r\n");
    out.push_str(&resp.body);
    let _ = s.write_all(out.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// The Key Vault REST semantics the provider relies on.
fn handle(req: &Req, mode: Mode, st: &Arc<Mutex<State>>) -> Resp {
    match req.auth() {
        None => {
            let mut r = error_resp(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
            );
            r.challenge = true;
            return r;
        }
        Some(a) if a != format!("Bearer {TOKEN}") || mode == Mode::Reject401 => {
            let mut r = error_resp(401, "Unauthorized", "AKV10032: Invalid issuer.");
            r.challenge = true;
            return r;
        }
        Some(_) => {}
    }
    if req.method != "POST" {
        return error_resp(405, "MethodNotAllowed", "only POST here");
    }
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
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
            return json_resp(
                403,
                serde_json::json!({"error": {
                    "code": "Forbidden",
                    "message": format!("The user, group or application 'appid=11111111-2222-3333-4444-555555555555' does not have keys {} permission on key vault 'kmsfs;location=westeurope'.", op_name.to_ascii_lowercase()),
                    "innererror": {"code": "AccessDenied"}
                }}),
            )
        }
        Mode::Disabled403 => {
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
    json_resp(
        200,
        serde_json::json!({"kid": kid, "value": B64URL.encode(out)}),
    )
}

/// Hands out TOKEN and records the scopes it was asked for.
#[derive(Debug, Default)]
struct FakeCredential {
    scopes: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl TokenCredential for FakeCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
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

fn binding(ctx: &WrapContext) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"kmsfs azure wrap v1\0");
    h.update(ctx.canonical_bytes());
    h.finalize().to_vec()
}

fn dek_err(r: Result<Dek, KmsError>) -> KmsError {
    match r {
        Ok(_) => panic!("unwrap unexpectedly succeeded"),
        Err(e) => e,
    }
}

fn assert_no_secrets(err: &KmsError) {
    let s = err.to_string();
    assert!(!s.contains(TOKEN), "error leaks the token: {s}");
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_and_requests_sent() {
    let mock = Mock::start().await;
    let (kms, cred) = mock.kms(None);
    assert_eq!(kms.kind(), "azure");
    let ctx = WrapContext { file_id: [7; 16] };
    let (dek, wrapped) = kms.generate_dek(&ctx).await.unwrap();
    let key_id = format!("{}/keys/{KEY}", mock.vault_url());
    assert_eq!(
        wrapped.key_ref,
        KeyRef {
            provider: "azure".into(),
            key_id: key_id.clone(),
            key_version: V1.into(),
        }
    );
    assert_eq!(kms.key_id(), key_id);
    assert!(kms.handles(&wrapped.key_ref));
    assert!(!kms.handles(&KeyRef {
        provider: "azure".into(),
        key_id: format!("{}/keys/other", mock.vault_url()),
        key_version: V1.into(),
    }));
    assert!(!kms.handles(&KeyRef {
        provider: "gcp".into(),
        key_id: key_id.clone(),
        key_version: V1.into(),
    }));
    let back = kms.unwrap(&wrapped, &ctx).await.unwrap();
    assert_eq!(back.as_bytes(), dek.as_bytes());

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    // 1. The SDK's first request carries neither a token nor the DEK: it
    //    only provokes the authentication challenge.
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, format!("/keys/{KEY}//wrapkey"));
    assert!(reqs[0].auth().is_none());
    assert!(reqs[0].body.is_empty(), "DEK sent before authentication");
    // 2. wrapKey with the token, latest version (empty path segment).
    let w = &reqs[1];
    assert_eq!(w.method, "POST");
    assert_eq!(w.path, format!("/keys/{KEY}//wrapkey"));
    assert_eq!(
        w.query.get("api-version").map(String::as_str),
        Some(API_VERSION)
    );
    assert_eq!(w.auth(), Some(format!("Bearer {TOKEN}").as_str()));
    assert!(w
        .headers
        .get("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = w.json();
    assert_eq!(body["alg"], "RSA-OAEP-256");
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "unexpected fields: {body}"
    );
    let plain = B64URL.decode(body["value"].as_str().unwrap()).unwrap();
    assert_eq!(plain.len(), 64);
    assert_eq!(&plain[..32], dek.as_bytes());
    assert_eq!(&plain[32..], &binding(&ctx)[..], "context binding");
    // 3. unwrapKey names the version the wrap reported.
    let u = &reqs[2];
    assert_eq!(u.method, "POST");
    assert_eq!(u.path, format!("/keys/{KEY}/{V1}/unwrapkey"));
    assert_eq!(
        u.query.get("api-version").map(String::as_str),
        Some(API_VERSION)
    );
    assert_eq!(u.auth(), Some(format!("Bearer {TOKEN}").as_str()));
    let body = u.json();
    assert_eq!(body["alg"], "RSA-OAEP-256");
    assert_eq!(
        B64URL.decode(body["value"].as_str().unwrap()).unwrap(),
        wrapped.blob
    );
    // The token was asked for the scope from the vault's challenge.
    let scopes = cred.scopes.lock().unwrap().clone();
    assert!(!scopes.is_empty());
    assert!(
        scopes
            .iter()
            .all(|s| s == "https://vault.localhost/.default"),
        "{scopes:?}"
    );

    // check() is a round trip too.
    kms.check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_version_and_rotation() {
    let mock = Mock::start().await;
    let (pinned, _) = mock.kms(Some(V1));
    let (latest, _) = mock.kms(None);
    let ctx = WrapContext { file_id: [1; 16] };
    let (d1, w1) = latest.generate_dek(&ctx).await.unwrap();
    assert_eq!(w1.key_ref.key_version, V1);
    mock.rotate();
    mock.clear();
    let (d2, w2) = latest.generate_dek(&ctx).await.unwrap();
    assert_eq!(w2.key_ref.key_version, V2);
    let (d3, w3) = pinned.generate_dek(&ctx).await.unwrap();
    assert_eq!(w3.key_ref.key_version, V1);
    let paths: Vec<String> = mock
        .requests()
        .iter()
        .filter(|r| r.auth().is_some())
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        vec![
            format!("/keys/{KEY}//wrapkey"),
            format!("/keys/{KEY}/{V1}/wrapkey")
        ]
    );
    // Every version still unwraps, through either provider.
    for (d, w) in [(&d1, &w1), (&d2, &w2), (&d3, &w3)] {
        assert_eq!(
            latest.unwrap(w, &ctx).await.unwrap().as_bytes(),
            d.as_bytes()
        );
        assert_eq!(
            pinned.unwrap(w, &ctx).await.unwrap().as_bytes(),
            d.as_bytes()
        );
    }
    assert!(latest.describe().contains("latest"));
    assert!(pinned.describe().contains(V1));
}

#[tokio::test(flavor = "multi_thread")]
async fn context_mismatch_and_tampering_fail_to_unwrap() {
    let mock = Mock::start().await;
    let (kms, _) = mock.kms(None);
    let ctx = WrapContext { file_id: [1; 16] };
    let dek = Dek::generate();
    let wrapped = kms.wrap(&dek, &ctx).await.unwrap();
    // The sidecar moved to another file: Key Vault unwraps, kmsfs refuses.
    let other = WrapContext { file_id: [2; 16] };
    let err = dek_err(kms.unwrap(&wrapped, &other).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
    assert!(err.to_string().contains("another file"), "{err}");
    assert!(!err.is_retryable());
    // A tampered blob: the vault refuses (400) -> UnwrapFailed.
    let mut bad = wrapped.clone();
    bad.blob[20] ^= 1;
    let err = dek_err(kms.unwrap(&bad, &ctx).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
    // A blob naming an unknown version: 404 -> KeyNotFound.
    let mut unknown = wrapped.clone();
    unknown.key_ref.key_version = "00000000000000000000000000000000".into();
    let err = dek_err(kms.unwrap(&unknown, &ctx).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");
    // A key reference from another vault is not ours.
    let mut foreign = wrapped.clone();
    foreign.key_ref.key_id = "https://other.vault.azure.net/keys/kek".into();
    let err = dek_err(kms.unwrap(&foreign, &ctx).await);
    assert!(matches!(err, KmsError::NoProvider { .. }), "{err}");
    // The right context still works.
    assert_eq!(
        kms.unwrap(&wrapped, &ctx).await.unwrap().as_bytes(),
        dek.as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn service_errors_are_classified() {
    let mock = Mock::start().await;
    let (kms, _) = mock.kms(None);
    let ctx = WrapContext { file_id: [3; 16] };
    let dek = Dek::generate();
    let wrapped = kms.wrap(&dek, &ctx).await.unwrap();

    mock.set_mode(Mode::Reject401);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    assert_no_secrets(&err);
    assert!(!err.is_retryable());

    mock.set_mode(Mode::Deny403);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(
            err,
            KmsError::PermissionDenied {
                operation: "wrapKey",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("keys/wrapKey"), "{err}");
    let err = dek_err(kms.unwrap(&wrapped, &ctx).await);
    assert!(
        matches!(
            err,
            KmsError::PermissionDenied {
                operation: "unwrapKey",
                ..
            }
        ),
        "{err}"
    );
    assert_no_secrets(&err);

    mock.set_mode(Mode::Disabled403);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyVersionUnusable { .. }), "{err}");
    assert!(err.to_string().contains("disabled"), "{err}");

    mock.set_mode(Mode::Normal);
    let mut cfg = mock.cfg(None, 10);
    cfg.key_name = "missing".into();
    let missing = mock.kms_with(&cfg, mock.addr, Arc::new(FakeCredential::default()));
    let err = missing.wrap(&dek, &ctx).await.unwrap_err();
    match &err {
        KmsError::KeyNotFound { key, .. } => {
            assert_eq!(key, &format!("{}/keys/missing", mock.vault_url()))
        }
        other => panic!("expected KeyNotFound, got {other}"),
    }
    // And the provider still works once the vault is back to normal.
    assert_eq!(
        kms.unwrap(&wrapped, &ctx).await.unwrap().as_bytes(),
        dek.as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_and_timeout() {
    let mock = Mock::start().await;
    let ctx = WrapContext { file_id: [4; 16] };
    let dek = Dek::generate();
    // Nothing listens on this port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = mock.cfg(None, 10);
    cfg.vault_url = format!("https://{HOST}:{}", closed.port());
    let kms = mock.kms_with(&cfg, closed, Arc::new(FakeCredential::default()));
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err}");
    assert!(err.is_retryable());

    // A vault that accepts but never answers.
    mock.set_mode(Mode::Hang);
    let kms = mock.kms_with(
        &mock.cfg(None, 1),
        mock.addr,
        Arc::new(FakeCredential::default()),
    );
    let t = std::time::Instant::now();
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Timeout { seconds: 1, .. }), "{err}");
    assert!(err.is_retryable());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn config_is_validated() {
    let cred: Arc<dyn TokenCredential> = Arc::new(FakeCredential::default());
    let base = AzureConfig {
        vault_url: "https://myvault.vault.azure.net/".into(),
        key_name: "kek".into(),
        key_version: Some(String::new()),
        timeout_secs: 10,
    };
    // Trailing slash and empty version are normalised.
    let kms = AzureKms::with_credential(&base, cred.clone(), None).unwrap();
    assert_eq!(kms.key_id(), "https://myvault.vault.azure.net/keys/kek");
    assert!(kms.describe().contains("latest"));
    for bad in [
        AzureConfig {
            vault_url: "http://myvault.vault.azure.net".into(),
            ..base.clone()
        },
        AzureConfig {
            vault_url: "https://myvault.vault.azure.net/keys/kek".into(),
            ..base.clone()
        },
        AzureConfig {
            key_name: "a/b".into(),
            ..base.clone()
        },
        AzureConfig {
            key_version: Some("../x".into()),
            ..base.clone()
        },
    ] {
        let Err(err) = AzureKms::with_credential(&bad, cred.clone(), None) else {
            panic!("accepted {bad:?}")
        };
        assert!(matches!(err, KmsError::Config(_)), "{err}");
    }
}
