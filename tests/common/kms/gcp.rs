//! A local HTTP mock of the GCP Cloud KMS REST API (`POST
//! /v1/{name}:encrypt`, `POST /v1/{cryptoKey}:decrypt`, and for versions
//! and rotation `GET /v1/{cryptoKey}`, `GET /v1/{cryptoKey}/cryptoKeyVersions`
//! (paged), `GET /v1/{cryptoKeyVersion}`, `POST
//! /v1/{cryptoKey}/cryptoKeyVersions`, `POST
//! /v1/{cryptoKey}:updatePrimaryVersion`), which is what
//! `google-cloud-kms-v1` speaks (REST/JSON, not gRPC).
//!
//! The mock holds real keys (AES-256-GCM per CryptoKeyVersion, with the
//! request's additionalAuthenticatedData as AAD), so round trips and context
//! mismatches are real. The provider is built as in production, from a
//! service-account key file (a fresh RSA key made by the mock) and the
//! `endpoint` override; the mock checks the self-signed JWT bearer token
//! against that key.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use kmsfs::kms::gcp::{GcpConfig, GcpKms};
use kmsfs::kms::KeyProvider;
use rand::RngCore;

pub use super::http_mock::Mode;
use super::http_mock::{MockServer, Req, Resp};

pub const KEY_ID: &str = "projects/test-proj/locations/europe-west1/keyRings/ring/cryptoKeys/kek";
const SA_EMAIL: &str = "kmsfs-test@test-proj.iam.gserviceaccount.com";
const SA_KEY_ID: &str = "0123456789abcdef";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Bytes of a base64 field, whichever alphabet the client chose.
pub fn b64_decode(s: &str) -> Vec<u8> {
    B64.decode(s)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(s))
        .or_else(|_| B64URL.decode(s))
        .expect("base64")
}

/// When the mock's versions were created: version N at `CREATED_BASE +
/// (N - 1) * CREATED_STEP`.
pub const CREATED_BASE: i64 = 1_700_000_000;
pub const CREATED_STEP: i64 = 100;
/// Versions per page of `GET .../cryptoKeyVersions`, whatever pageSize says.
pub const VERSIONS_PAGE: usize = 2;
/// CryptoKeyVersionState as the int enum encoding the client asks for.
const ENABLED: i32 = 1;
const DISABLED: i32 = 2;
const PENDING_GENERATION: i32 = 5;

struct State {
    mode: Mode,
    versions: HashMap<u8, [u8; 32]>,
    primary: u8,
    /// RSAPublicKey DER of the service account, to verify its JWTs.
    sa_public_key: Vec<u8>,
    /// Versions not ENABLED, and their state.
    states: HashMap<u8, i32>,
    /// How many GETs of a version created by the API see it still
    /// PENDING_GENERATION.
    generation_polls: u32,
    pending: HashMap<u8, u32>,
    /// Permissions refused whatever the mode.
    denied: HashSet<String>,
}

impl State {
    fn state(&self, v: u8) -> i32 {
        self.states.get(&v).copied().unwrap_or(ENABLED)
    }

    fn version_json(&self, v: u8) -> serde_json::Value {
        let created = rfc3339(CREATED_BASE + CREATED_STEP * (i64::from(v) - 1));
        serde_json::json!({
            "name": format!("{KEY_ID}/cryptoKeyVersions/{v}"),
            "state": self.state(v),
            "protectionLevel": 1,
            "algorithm": 1,
            "createTime": created,
            "generateTime": created,
        })
    }

    fn key_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": KEY_ID,
            "primary": self.version_json(self.primary),
            "purpose": 1,
            "createTime": rfc3339(CREATED_BASE),
            "versionTemplate": {"protectionLevel": 1, "algorithm": 1},
        })
    }
}

/// Seconds since the epoch as RFC 3339 (UTC), as Cloud KMS writes times.
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000000000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub struct Mock {
    pub server: MockServer,
    state: Arc<Mutex<State>>,
    /// Holds the service-account key file.
    pub dir: tempfile::TempDir,
    /// The service-account key file the provider signs its tokens with.
    pub key_file: std::path::PathBuf,
}

impl Mock {
    pub async fn start() -> Mock {
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
            versions,
            primary: 1,
            sa_public_key: sa_key.public_key_raw().to_vec(),
            states: HashMap::new(),
            generation_polls: 0,
            pending: HashMap::new(),
            denied: HashSet::new(),
        }));
        let st = state.clone();
        let server = MockServer::http(Arc::new(move |req: &Req| handle(req, &st))).await;
        Mock {
            server,
            state,
            dir,
            key_file,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.addr.port())
    }

    pub fn cfg(&self, version: Option<&str>) -> GcpConfig {
        GcpConfig {
            project: "test-proj".into(),
            location: "europe-west1".into(),
            key_ring: "ring".into(),
            key: "kek".into(),
            key_version: version.map(str::to_owned),
            credentials_file: Some(self.key_file.clone()),
            endpoint: Some(self.endpoint()),
            allow_http: true,
            timeout_secs: 10,
        }
    }

    pub async fn kms(&self, version: Option<&str>) -> Arc<dyn KeyProvider> {
        GcpKms::connect(&self.cfg(version)).await.unwrap()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// A new key version becomes the primary.
    pub fn rotate(&self) {
        let mut s = self.state.lock().unwrap();
        s.versions.insert(2, rand::random::<[u8; 32]>());
        s.primary = 2;
    }

    pub fn requests(&self) -> Vec<Req> {
        self.server.requests()
    }

    /// The key's version IDs, oldest first, and its primary.
    pub fn versions(&self) -> (Vec<u8>, u8) {
        let s = self.state.lock().unwrap();
        let mut ids: Vec<u8> = s.versions.keys().copied().collect();
        ids.sort();
        (ids, s.primary)
    }

    /// Disables a version: listed DISABLED, it neither encrypts nor
    /// decrypts.
    pub fn disable(&self, version: u8) {
        self.state.lock().unwrap().states.insert(version, DISABLED);
    }

    /// Versions created through the API from now on stay
    /// PENDING_GENERATION for `polls` GETs.
    pub fn set_generation_polls(&self, polls: u32) {
        self.state.lock().unwrap().generation_polls = polls;
    }

    /// Refuses `permission` (e.g. `cloudkms.cryptoKeys.update`) from now on.
    pub fn deny(&self, permission: &str) {
        self.state
            .lock()
            .unwrap()
            .denied
            .insert(permission.to_string());
    }

    pub fn clear(&self) {
        self.server.clear();
    }

    /// Whether `req` carries a JWT signed by the service account's key.
    pub fn token_ok(&self, req: &Req) -> bool {
        token_ok(req, &self.state)
    }
}

fn status_resp(http: u16, status: &str, message: &str) -> Resp {
    Resp::json(
        http,
        serde_json::json!({"error": {"code": http, "message": message, "status": status}}),
    )
}

/// Checks the bearer token: a JWT signed (RS256) by the service account's key.
fn token_ok(req: &Req, st: &Mutex<State>) -> bool {
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
fn handle(req: &Req, st: &Mutex<State>) -> Resp {
    let mode = st.lock().unwrap().mode;
    if mode == Mode::Reject401 || !token_ok(req, st) {
        return status_resp(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        );
    }
    if req.method == "GET"
        || req.path.ends_with("/cryptoKeyVersions")
        || req.path.ends_with(":updatePrimaryVersion")
    {
        return handle_versions(req, st, mode);
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
        if mode == Mode::Disabled || g.state(v) != ENABLED {
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
        Resp::json(
            200,
            serde_json::json!({
                "name": format!("{KEY_ID}/cryptoKeyVersions/{v}"),
                "ciphertext": B64.encode(&ct),
                "ciphertextCrc32c": "12345",
                "verifiedPlaintextCrc32c": false,
                "verifiedAdditionalAuthenticatedDataCrc32c": false,
                "protectionLevel": 1
            }),
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
        if mode == Mode::Disabled || g.state(ct[0]) != ENABLED {
            return status_resp(
                400,
                "FAILED_PRECONDITION",
                &format!(
                    "{KEY_ID}/cryptoKeyVersions/{} is not enabled, current state is: DISABLED.",
                    ct[0]
                ),
            );
        }
        match Aes256Gcm::new_from_slice(k).unwrap().decrypt(
            Nonce::from_slice(&ct[1..13]),
            Payload {
                msg: &ct[13..],
                aad: &aad,
            },
        ) {
            Ok(pt) => Resp::json(
                200,
                serde_json::json!({"plaintext": B64.encode(pt), "plaintextCrc32c": "1", "usedPrimary": ct[0] == g.primary, "protectionLevel": 1}),
            ),
            Err(_) => invalid(),
        }
    }
}

/// The key's metadata calls (authenticated already): get the key, list its
/// versions ([`VERSIONS_PAGE`] a page), get one version, create a version
/// (not primary), make a version primary.
fn handle_versions(req: &Req, st: &Mutex<State>, mode: Mode) -> Resp {
    let Some(name) = req.path.strip_prefix("/v1/") else {
        return status_resp(404, "NOT_FOUND", "bad path");
    };
    let versions_of = format!("{KEY_ID}/cryptoKeyVersions");
    let (permission, what) = match (req.method.as_str(), name) {
        ("GET", n) if n == KEY_ID => ("cloudkms.cryptoKeys.get", "get"),
        ("GET", n) if n == versions_of => ("cloudkms.cryptoKeyVersions.list", "list"),
        ("GET", n) if n.starts_with(&format!("{versions_of}/")) => {
            ("cloudkms.cryptoKeyVersions.get", "get version")
        }
        ("POST", n) if n == versions_of => ("cloudkms.cryptoKeyVersions.create", "create"),
        ("POST", n) if n == format!("{KEY_ID}:updatePrimaryVersion") => {
            ("cloudkms.cryptoKeys.update", "primary")
        }
        _ => return status_resp(404, "NOT_FOUND", &format!("{name} not found.")),
    };
    let mut g = st.lock().unwrap();
    if mode == Mode::Deny403 || g.denied.contains(permission) {
        return status_resp(
            403,
            "PERMISSION_DENIED",
            &format!(
                "Permission '{permission}' denied on resource '{name}' (or it may not exist)."
            ),
        );
    }
    match what {
        "get" => Resp::json(200, g.key_json()),
        "list" => {
            let skip: usize = req
                .param("pageToken")
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.strip_prefix("after-")
                        .expect("a page token of ours")
                        .parse()
                        .unwrap()
                })
                .unwrap_or(0);
            let mut ids: Vec<u8> = g.versions.keys().copied().collect();
            ids.sort();
            let page: Vec<serde_json::Value> = ids
                .iter()
                .skip(skip)
                .take(VERSIONS_PAGE)
                .map(|v| g.version_json(*v))
                .collect();
            let next = skip + VERSIONS_PAGE;
            let mut body = serde_json::json!({"cryptoKeyVersions": page, "totalSize": ids.len()});
            if next < ids.len() {
                body["nextPageToken"] = format!("after-{next}").into();
            }
            Resp::json(200, body)
        }
        "get version" => {
            let id = name.rsplit('/').next().unwrap_or_default();
            let Some(v) = id.parse::<u8>().ok().filter(|v| g.versions.contains_key(v)) else {
                return status_resp(404, "NOT_FOUND", &format!("{name} not found."));
            };
            if let Some(left) = g.pending.get_mut(&v) {
                if *left == 0 {
                    g.pending.remove(&v);
                    g.states.remove(&v);
                } else {
                    *left -= 1;
                }
            }
            Resp::json(200, g.version_json(v))
        }
        "create" => {
            let v = g.versions.keys().max().copied().unwrap_or(0) + 1;
            g.versions.insert(v, rand::random::<[u8; 32]>());
            if g.generation_polls > 0 {
                let polls = g.generation_polls;
                g.states.insert(v, PENDING_GENERATION);
                g.pending.insert(v, polls);
            }
            Resp::json(200, g.version_json(v))
        }
        _ => {
            let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let Some(v) = body["cryptoKeyVersionId"]
                .as_str()
                .and_then(|v| v.parse::<u8>().ok())
                .filter(|v| g.versions.contains_key(v))
            else {
                return status_resp(404, "NOT_FOUND", "no such version");
            };
            if g.state(v) != ENABLED {
                return status_resp(
                    400,
                    "FAILED_PRECONDITION",
                    &format!("{KEY_ID}/cryptoKeyVersions/{v} is not enabled."),
                );
            }
            g.primary = v;
            Resp::json(200, g.key_json())
        }
    }
}
