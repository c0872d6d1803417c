//! The GCP Cloud KMS provider against a local HTTP mock of the Cloud KMS REST
//! API (`POST /v1/{name}:encrypt`, `POST /v1/{cryptoKey}:decrypt`), which is
//! what `google-cloud-kms-v1` speaks (REST/JSON, not gRPC).
//!
//! The mock holds real keys (AES-256-GCM per CryptoKeyVersion, with the
//! request's additionalAuthenticatedData as AAD), so round trips and context
//! mismatches are real. The provider is built exactly as in production,
//! through `GcpKms::connect` with a service-account key file (a fresh RSA key
//! made by the test) and the `endpoint` override; the mock checks the
//! self-signed JWT bearer token against that key.
#![cfg(feature = "gcp")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use kmsfs::crypto::Dek;
use kmsfs::kms::gcp::{GcpConfig, GcpKms};
use kmsfs::kms::{KeyProvider, KeyRef, KmsError, WrapContext};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const KEY_ID: &str = "projects/test-proj/locations/europe-west1/keyRings/ring/cryptoKeys/kek";
const SA_EMAIL: &str = "kmsfs-test@test-proj.iam.gserviceaccount.com";
const SA_KEY_ID: &str = "0123456789abcdef";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn b64_decode(s: &str) -> Vec<u8> {
    B64.decode(s)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(s))
        .or_else(|_| B64URL.decode(s))
        .expect("base64")
}

#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Req {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON request body")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Normal,
    Reject401,
    Deny403,
    Disabled,
    Hang,
}

struct State {
    mode: Mode,
    requests: Vec<Req>,
    versions: HashMap<u8, [u8; 32]>,
    primary: u8,
    /// RSAPublicKey DER of the service account, to verify its JWTs.
    sa_public_key: Vec<u8>,
}

struct Mock {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _dir: tempfile::TempDir,
    key_file: std::path::PathBuf,
}

impl Mock {
    async fn start() -> Mock {
        let sa_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("sa.json");
        let sa = serde_json::json!({
            "type": "service_account",
            "project_id": "test-proj",
            "private_key_id": SA_KEY_ID,
            "private_key": sa_key.serialize_pem(),
            "client_email": SA_EMAIL,
            "client_id": "123456789",
            "token_uri": "http://127.0.0.1:9/token",
        });
        std::fs::write(&key_file, sa.to_string()).unwrap();
        let mut versions = HashMap::new();
        versions.insert(1u8, rand::random::<[u8; 32]>());
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Normal,
            requests: Vec::new(),
            versions,
            primary: 1,
            sa_public_key: sa_key.public_key_raw().to_vec(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(serve(tcp, st));
            }
        });
        Mock {
            addr,
            state,
            _dir: dir,
            key_file,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    fn cfg(&self, version: Option<&str>) -> GcpConfig {
        GcpConfig {
            project: "test-proj".into(),
            location: "europe-west1".into(),
            key_ring: "ring".into(),
            key: "kek".into(),
            key_version: version.map(str::to_owned),
            credentials_file: Some(self.key_file.clone()),
            endpoint: Some(self.endpoint()),
            timeout_secs: 10,
        }
    }

    async fn kms(&self, version: Option<&str>) -> Arc<dyn KeyProvider> {
        GcpKms::connect(&self.cfg(version)).await.unwrap()
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn rotate(&self) {
        let mut s = self.state.lock().unwrap();
        s.versions.insert(2, rand::random::<[u8; 32]>());
        s.primary = 2;
    }

    fn requests(&self) -> Vec<Req> {
        self.state.lock().unwrap().requests.clone()
    }

    fn clear(&self) {
        self.state.lock().unwrap().requests.clear();
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

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
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Req {
        method,
        path: percent_decode(path),
        query,
        headers,
        body,
    })
}

fn status_resp(http: u16, status: &str, message: &str) -> (u16, String) {
    (
        http,
        serde_json::json!({"error": {"code": http, "message": message, "status": status}})
            .to_string(),
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
    let (status, body) = handle(&req, mode, &st);
    let out = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json; charset=UTF-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(out.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// Checks the bearer token: a JWT signed (RS256) by the service account's key.
fn token_ok(req: &Req, st: &Arc<Mutex<State>>) -> bool {
    let Some(jwt) = req
        .headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
    else {
        return false;
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return false;
    }
    let Ok(header) = B64URL.decode(parts[0]) else {
        return false;
    };
    let Ok(claims) = B64URL.decode(parts[1]) else {
        return false;
    };
    let Ok(sig) = B64URL.decode(parts[2]) else {
        return false;
    };
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap_or_default();
    let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap_or_default();
    if header["alg"] != "RS256"
        || header["kid"] != SA_KEY_ID
        || claims["iss"] != SA_EMAIL
        || claims["sub"] != SA_EMAIL
    {
        return false;
    }
    let public_key = st.lock().unwrap().sa_public_key.clone();
    let provider = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider();
    let algs = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == tokio_rustls::rustls::SignatureScheme::RSA_PKCS1_SHA256)
        .map(|(_, algs)| *algs)
        .unwrap();
    let signed = format!("{}.{}", parts[0], parts[1]);
    algs.iter().any(|a| {
        a.verify_signature(&public_key, signed.as_bytes(), &sig)
            .is_ok()
    })
}

/// The Cloud KMS REST semantics the provider relies on.
fn handle(req: &Req, mode: Mode, st: &Arc<Mutex<State>>) -> (u16, String) {
    if mode == Mode::Reject401 || !token_ok(req, st) {
        return status_resp(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        );
    }
    if req.method != "POST" {
        return status_resp(404, "NOT_FOUND", "no such method");
    }
    let Some(rest) = req.path.strip_prefix("/v1/") else {
        return status_resp(404, "NOT_FOUND", "bad path");
    };
    let Some((name, verb)) = rest.rsplit_once(':') else {
        return status_resp(404, "NOT_FOUND", "bad path");
    };
    let permission = match verb {
        "encrypt" => "cloudkms.cryptoKeyVersions.useToEncrypt",
        "decrypt" => "cloudkms.cryptoKeyVersions.useToDecrypt",
        _ => return status_resp(404, "NOT_FOUND", "bad verb"),
    };
    let (key, version) = match name.split_once("/cryptoKeyVersions/") {
        Some((k, v)) => (k, Some(v)),
        None => (name, None),
    };
    if mode == Mode::Deny403 {
        return status_resp(
            403,
            "PERMISSION_DENIED",
            &format!(
                "Permission '{permission}' denied on resource '{name}' (or it may not exist)."
            ),
        );
    }
    if key != KEY_ID {
        return status_resp(404, "NOT_FOUND", &format!("{name} not found."));
    }
    let body: serde_json::Value = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(_) => return status_resp(400, "INVALID_ARGUMENT", "Invalid JSON payload received."),
    };
    let aad = body["additionalAuthenticatedData"]
        .as_str()
        .map(b64_decode)
        .unwrap_or_default();
    let g = st.lock().unwrap();
    if verb == "encrypt" {
        let v: u8 = match version {
            Some(v) => match v.parse() {
                Ok(v) => v,
                Err(_) => return status_resp(404, "NOT_FOUND", &format!("{name} not found.")),
            },
            None => g.primary,
        };
        let Some(k) = g.versions.get(&v) else {
            return status_resp(404, "NOT_FOUND", &format!("{name} not found."));
        };
        if mode == Mode::Disabled {
            return status_resp(
                400,
                "FAILED_PRECONDITION",
                &format!(
                    "{KEY_ID}/cryptoKeyVersions/{v} is not enabled, current state is: DISABLED."
                ),
            );
        }
        let plaintext = body["plaintext"]
            .as_str()
            .map(b64_decode)
            .unwrap_or_default();
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut ct = vec![v];
        ct.extend_from_slice(&nonce);
        ct.extend(
            Aes256Gcm::new_from_slice(k)
                .unwrap()
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &plaintext,
                        aad: &aad,
                    },
                )
                .unwrap(),
        );
        (
            200,
            serde_json::json!({
                "name": format!("{KEY_ID}/cryptoKeyVersions/{v}"),
                "ciphertext": B64.encode(&ct),
                "ciphertextCrc32c": "12345",
                "verifiedPlaintextCrc32c": false,
                "verifiedAdditionalAuthenticatedDataCrc32c": false,
                "protectionLevel": 1
            })
            .to_string(),
        )
    } else {
        if version.is_some() {
            return status_resp(
                400,
                "INVALID_ARGUMENT",
                "decrypt takes a CryptoKey, not a version",
            );
        }
        let ct = body["ciphertext"]
            .as_str()
            .map(b64_decode)
            .unwrap_or_default();
        let invalid = || {
            status_resp(
                400,
                "INVALID_ARGUMENT",
                "Decryption failed: the ciphertext is invalid.",
            )
        };
        if ct.len() < 1 + 12 + 16 {
            return invalid();
        }
        let Some(k) = g.versions.get(&ct[0]) else {
            return invalid();
        };
        if mode == Mode::Disabled {
            return status_resp(
                400,
                "FAILED_PRECONDITION",
                &format!(
                    "{KEY_ID}/cryptoKeyVersions/{} is not enabled, current state is: DISABLED.",
                    ct[0]
                ),
            );
        }
        match Aes256Gcm::new_from_slice(k)
            .unwrap()
            .decrypt(Nonce::from_slice(&ct[1..13]), Payload { msg: &ct[13..], aad: &aad })
        {
            Ok(pt) => (
                200,
                serde_json::json!({"plaintext": B64.encode(pt), "plaintextCrc32c": "1", "usedPrimary": ct[0] == g.primary, "protectionLevel": 1})
                    .to_string(),
            ),
            Err(_) => invalid(),
        }
    }
}

fn dek_err(r: Result<Dek, KmsError>) -> KmsError {
    match r {
        Ok(_) => panic!("unwrap unexpectedly succeeded"),
        Err(e) => e,
    }
}

fn assert_no_secrets(err: &KmsError) {
    let s = err.to_string();
    assert!(
        !s.contains("PRIVATE KEY") && !s.contains("eyJ"),
        "error leaks credentials: {s}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_and_requests_sent() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    assert_eq!(kms.kind(), "gcp");
    let ctx = WrapContext { file_id: [9; 16] };
    let (dek, wrapped) = kms.generate_dek(&ctx).await.unwrap();
    assert_eq!(
        wrapped.key_ref,
        KeyRef {
            provider: "gcp".into(),
            key_id: KEY_ID.into(),
            key_version: "1".into(),
        }
    );
    assert!(kms.handles(&wrapped.key_ref));
    assert!(!kms.handles(&KeyRef {
        provider: "gcp".into(),
        key_id: "projects/test-proj/locations/europe-west1/keyRings/ring/cryptoKeys/other".into(),
        key_version: "1".into(),
    }));
    assert!(!kms.handles(&KeyRef {
        provider: "aws".into(),
        key_id: KEY_ID.into(),
        key_version: "1".into(),
    }));
    let back = kms.unwrap(&wrapped, &ctx).await.unwrap();
    assert_eq!(back.as_bytes(), dek.as_bytes());

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let e = &reqs[0];
    assert_eq!(e.method, "POST");
    assert_eq!(e.path, format!("/v1/{KEY_ID}:encrypt"));
    assert_eq!(
        e.query.get("$alt").map(String::as_str),
        Some("json;enum-encoding=int")
    );
    assert!(e
        .headers
        .get("content-type")
        .unwrap()
        .starts_with("application/json"));
    assert!(e.headers.contains_key("x-goog-api-client"));
    assert!(
        token_ok(e, &mock.state),
        "bearer token is not a JWT signed by the key file"
    );
    let body = e.json();
    assert_eq!(
        b64_decode(body["plaintext"].as_str().unwrap()),
        dek.as_bytes()
    );
    assert_eq!(
        b64_decode(
            body["additionalAuthenticatedData"]
                .as_str()
                .expect("AAD sent")
        ),
        ctx.canonical_bytes()
    );
    assert!(
        body.get("name").is_none(),
        "name belongs in the path: {body}"
    );
    let d = &reqs[1];
    assert_eq!(d.method, "POST");
    assert_eq!(d.path, format!("/v1/{KEY_ID}:decrypt"));
    assert!(token_ok(d, &mock.state));
    let body = d.json();
    assert_eq!(
        b64_decode(body["ciphertext"].as_str().unwrap()),
        wrapped.blob
    );
    assert_eq!(
        b64_decode(
            body["additionalAuthenticatedData"]
                .as_str()
                .expect("AAD sent")
        ),
        ctx.canonical_bytes()
    );

    kms.check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_version_and_rotation() {
    let mock = Mock::start().await;
    let primary = mock.kms(None).await;
    let (d1, w1) = primary
        .generate_dek(&WrapContext { file_id: [1; 16] })
        .await
        .unwrap();
    assert_eq!(w1.key_ref.key_version, "1");
    mock.rotate();
    let pinned = mock.kms(Some("1")).await;
    mock.clear();
    let ctx = WrapContext { file_id: [1; 16] };
    let (d2, w2) = primary.generate_dek(&ctx).await.unwrap();
    assert_eq!(w2.key_ref.key_version, "2");
    let (d3, w3) = pinned.generate_dek(&ctx).await.unwrap();
    assert_eq!(w3.key_ref.key_version, "1");
    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        vec![
            format!("/v1/{KEY_ID}:encrypt"),
            format!("/v1/{KEY_ID}/cryptoKeyVersions/1:encrypt")
        ]
    );
    for (d, w) in [(&d1, &w1), (&d2, &w2), (&d3, &w3)] {
        assert_eq!(
            primary.unwrap(w, &ctx).await.unwrap().as_bytes(),
            d.as_bytes()
        );
        assert_eq!(
            pinned.unwrap(w, &ctx).await.unwrap().as_bytes(),
            d.as_bytes()
        );
    }
    // Decrypt always names the CryptoKey: Cloud KMS finds the version.
    assert!(mock
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(":decrypt"))
        .all(|r| r.path == format!("/v1/{KEY_ID}:decrypt")));
}

#[tokio::test(flavor = "multi_thread")]
async fn context_mismatch_and_tampering_fail_to_unwrap() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    let ctx = WrapContext { file_id: [1; 16] };
    let dek = Dek::generate();
    let wrapped = kms.wrap(&dek, &ctx).await.unwrap();
    let err = dek_err(
        kms.unwrap(&wrapped, &WrapContext { file_id: [2; 16] })
            .await,
    );
    eprintln!("{err}");
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
    assert!(!err.is_retryable());
    let mut bad = wrapped.clone();
    let n = bad.blob.len();
    bad.blob[n - 1] ^= 1;
    let err = dek_err(kms.unwrap(&bad, &ctx).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
    let mut foreign = wrapped.clone();
    foreign.key_ref.key_id = "projects/x/locations/global/keyRings/r/cryptoKeys/k".into();
    let err = dek_err(kms.unwrap(&foreign, &ctx).await);
    assert!(matches!(err, KmsError::NoProvider { .. }), "{err}");
    assert_eq!(
        kms.unwrap(&wrapped, &ctx).await.unwrap().as_bytes(),
        dek.as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn service_errors_are_classified() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    let ctx = WrapContext { file_id: [3; 16] };
    let dek = Dek::generate();
    let wrapped = kms.wrap(&dek, &ctx).await.unwrap();

    mock.set_mode(Mode::Reject401);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    assert_no_secrets(&err);

    mock.set_mode(Mode::Deny403);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(
            err,
            KmsError::PermissionDenied {
                operation: "cloudkms.cryptoKeyVersions.useToEncrypt",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("cryptoKeyEncrypterDecrypter"),
        "{err}"
    );
    let err = dek_err(kms.unwrap(&wrapped, &ctx).await);
    eprintln!("{err}");
    assert!(
        matches!(
            err,
            KmsError::PermissionDenied {
                operation: "cloudkms.cryptoKeyVersions.useToDecrypt",
                ..
            }
        ),
        "{err}"
    );
    assert_no_secrets(&err);

    mock.set_mode(Mode::Disabled);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyVersionUnusable { .. }), "{err}");
    assert!(err.to_string().contains("DISABLED"), "{err}");
    let err = dek_err(kms.unwrap(&wrapped, &ctx).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyVersionUnusable { .. }), "{err}");

    mock.set_mode(Mode::Normal);
    let mut cfg = mock.cfg(None);
    cfg.key = "missing".into();
    let missing = GcpKms::connect(&cfg).await.unwrap();
    let err = missing.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");
    assert!(err.to_string().contains("cryptoKeys/missing"), "{err}");
    let mut cfg = mock.cfg(Some("7"));
    cfg.key = "kek".into();
    let err = GcpKms::connect(&cfg)
        .await
        .unwrap()
        .wrap(&dek, &ctx)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");

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
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = mock.cfg(None);
    cfg.endpoint = Some(format!("http://127.0.0.1:{}", closed.port()));
    let kms = GcpKms::connect(&cfg).await.unwrap();
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err}");
    assert!(err.is_retryable());

    mock.set_mode(Mode::Hang);
    let mut cfg = mock.cfg(None);
    cfg.timeout_secs = 1;
    let kms = GcpKms::connect(&cfg).await.unwrap();
    let t = std::time::Instant::now();
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Timeout { seconds: 1, .. }), "{err}");
    assert!(err.is_retryable());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn config_and_credentials_are_validated() {
    let mock = Mock::start().await;
    let base = mock.cfg(None);
    for bad in [
        GcpConfig {
            project: "a/b".into(),
            ..base.clone()
        },
        GcpConfig {
            key: String::new(),
            ..base.clone()
        },
        GcpConfig {
            endpoint: Some("cloudkms.googleapis.com".into()),
            ..base.clone()
        },
        GcpConfig {
            credentials_file: Some(mock._dir.path().join("missing.json")),
            ..base.clone()
        },
    ] {
        let Err(err) = GcpKms::connect(&bad).await else {
            panic!("accepted {bad:?}")
        };
        assert!(matches!(err, KmsError::Config(_)), "{err}");
    }
    // A key file of an unknown type, and one that is not JSON.
    let odd = mock._dir.path().join("odd.json");
    std::fs::write(&odd, r#"{"type":"something_else"}"#).unwrap();
    let Err(err) = GcpKms::connect(&GcpConfig {
        credentials_file: Some(odd.clone()),
        ..base.clone()
    })
    .await
    else {
        panic!("accepted an unknown credentials type")
    };
    assert!(err.to_string().contains("service_account"), "{err}");
    std::fs::write(&odd, "private_key = not json").unwrap();
    let Err(err) = GcpKms::connect(&GcpConfig {
        credentials_file: Some(odd),
        ..base.clone()
    })
    .await
    else {
        panic!("accepted a non-JSON key file")
    };
    assert!(
        !err.to_string().contains("not json"),
        "echoes the file: {err}"
    );
}
