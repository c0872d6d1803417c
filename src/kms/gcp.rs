//! GCP Cloud KMS provider: wraps DEKs with `encrypt`/`decrypt` under a
//! symmetric (ENCRYPT_DECRYPT) CryptoKey, binding the wrap context as
//! additional authenticated data (`ctx.canonical_bytes()`).
//!
//! The client is `google-cloud-kms-v1`, which talks REST/JSON over HTTPS
//! (`POST /v1/{name}:encrypt`, `POST /v1/{cryptoKey}:decrypt`).
//!
//! Credentials: the service-account key file `credentials_file` when set
//! (`authorized_user` and `external_account` files work too), else
//! application default credentials (`GOOGLE_APPLICATION_CREDENTIALS`, the
//! gcloud ADC file, or the metadata server).
//!
//! Decrypt always names the CryptoKey, not a version: Cloud KMS finds the
//! version from the ciphertext. The version recorded in key references is
//! the one the encrypt response reports, for information and audits.
//!
//! Versions and rotation: [`GcpKms::key_versions`] reads the key (its
//! primary) and lists its CryptoKeyVersions; [`GcpKms::rotate`] creates a
//! version and makes it the primary. A provider pinned to a version reports
//! that version as current and refuses to rotate (it would not follow).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_kms_v1::client::KeyManagementService;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionState;
use google_cloud_kms_v1::model::CryptoKeyVersion;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::support::{
    self, bad_response, clean_message, ensure_handles, error_chain, given, Direction,
};
use super::{KeyProvider, KeyRef, KeyVersion, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::crypto::Dek;

const PROVIDER: &str = "gcp";
const DEFAULT_ENDPOINT: &str = "https://cloudkms.googleapis.com";
/// Most pages of CryptoKeyVersions read (of up to 1000 each): a
/// `nextPageToken` that never ends stops here.
const MAX_VERSION_PAGES: usize = 100;
/// How often, and how long apart, a new version that is still being
/// generated (HSM, external keys) is looked at before it is made primary.
const GENERATION_POLLS: u32 = 8;
const GENERATION_POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpConfig {
    pub project: String,
    pub location: String,
    pub key_ring: String,
    pub key: String,
    /// Absent: the primary version encrypts.
    pub key_version: Option<String>,
    /// Service-account key file; absent: application default credentials.
    pub credentials_file: Option<PathBuf>,
    /// Custom endpoint (tests).
    pub endpoint: Option<String>,
    /// Allow a plain http:// endpoint (a dev server on loopback). Set only
    /// in the trusted configuration; refused otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    #[serde(default = "super::default_timeout_secs")]
    pub timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
    GetKey,
    ListVersions,
    GetVersion,
    CreateVersion,
    UpdatePrimary,
}

impl Op {
    fn direction(self) -> Direction {
        match self {
            Op::Decrypt => Direction::Unwrap,
            _ => Direction::Wrap,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::GetKey => "getCryptoKey",
            Op::ListVersions => "listCryptoKeyVersions",
            Op::GetVersion => "getCryptoKeyVersion",
            Op::CreateVersion => "createCryptoKeyVersion",
            Op::UpdatePrimary => "updateCryptoKeyPrimaryVersion",
        }
    }

    fn permission(self) -> &'static str {
        match self {
            Op::Encrypt => "cloudkms.cryptoKeyVersions.useToEncrypt",
            Op::Decrypt => "cloudkms.cryptoKeyVersions.useToDecrypt",
            Op::GetKey => "cloudkms.cryptoKeys.get",
            Op::ListVersions => "cloudkms.cryptoKeyVersions.list",
            Op::GetVersion => "cloudkms.cryptoKeyVersions.get",
            Op::CreateVersion => "cloudkms.cryptoKeyVersions.create",
            Op::UpdatePrimary => "cloudkms.cryptoKeys.update",
        }
    }

    /// A predefined role that has [`permission`](Self::permission).
    fn role(self) -> &'static str {
        match self {
            Op::Encrypt | Op::Decrypt => "roles/cloudkms.cryptoKeyEncrypterDecrypter",
            Op::GetKey | Op::ListVersions | Op::GetVersion => "roles/cloudkms.viewer",
            Op::CreateVersion | Op::UpdatePrimary => "roles/cloudkms.admin",
        }
    }
}

/// The GCP Cloud KMS provider.
pub struct GcpKms {
    client: KeyManagementService,
    /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
    key_id: String,
    /// Resource that encrypts: the key, or one of its versions.
    encrypt_name: String,
    key_version: Option<String>,
    endpoint: String,
    /// For the message of a timeout the client reports.
    timeout_secs: u64,
}

/// The service, as messages name it.
fn kms_name(endpoint: &str) -> String {
    format!("GCP Cloud KMS {endpoint}")
}

impl GcpConfig {
    /// What connecting waits on: the credentials (on GCE/GKE, the metadata
    /// server) before any request to the endpoint.
    pub(crate) fn kms_name(&self) -> String {
        format!(
            "{} (setting up credentials; is the metadata server reachable?)",
            kms_name(self.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT))
        )
    }
}

fn check_segment(what: &str, v: &str) -> Result<(), KmsError> {
    if v.is_empty() || v.contains('/') || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(KmsError::Config(format!(
            "gcp {what} {v:?} is invalid: it must be a single non-empty name without '/' or spaces"
        )));
    }
    Ok(())
}

/// Credentials from a key file: its `type` picks the builder.
fn credentials_from_file(
    path: &std::path::Path,
) -> Result<google_cloud_auth::credentials::Credentials, KmsError> {
    use google_cloud_auth::credentials::{external_account, service_account, user_account};
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            KmsError::Config(format!("gcp credentials file {}: {e}", path.display()))
        })?);
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        KmsError::Config(format!(
            "gcp credentials file {} is not JSON (line {}); download a service-account key as JSON",
            path.display(),
            e.line()
        ))
    })?;
    let kind = json
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_owned();
    let built = match kind.as_str() {
        "service_account" => service_account::Builder::new(json).build(),
        "authorized_user" => user_account::Builder::new(json).build(),
        "external_account" => external_account::Builder::new(json).build(),
        other => {
            return Err(KmsError::Config(format!(
                "gcp credentials file {} has type {other:?}; expected \"service_account\" (or \"authorized_user\"/\"external_account\")",
                path.display()
            )))
        }
    };
    built.map_err(|e| {
        KmsError::Config(format!(
            "gcp credentials file {} ({kind}): {}",
            path.display(),
            error_chain(&e)
        ))
    })
}

impl GcpKms {
    /// Connects with the configured credentials (key file, else application
    /// default credentials). Makes no request: the first wrap or `check` does.
    pub async fn connect(cfg: &GcpConfig) -> Result<Arc<dyn KeyProvider>, KmsError> {
        let credentials = match &cfg.credentials_file {
            Some(path) => credentials_from_file(path)?,
            None => google_cloud_auth::credentials::Builder::default().build().map_err(|e| {
                KmsError::Config(format!(
                    "gcp application default credentials: {}; set GOOGLE_APPLICATION_CREDENTIALS or --gcp-credentials-file to a service-account key, or run `gcloud auth application-default login`",
                    error_chain(&e)
                ))
            })?,
        };
        Ok(Arc::new(Self::with_credentials(cfg, credentials).await?))
    }

    /// Builds the provider with given credentials. Retries are off: a
    /// generic wrapper retries retryable errors.
    pub async fn with_credentials(
        cfg: &GcpConfig, credentials: google_cloud_auth::credentials::Credentials,
    ) -> Result<Self, KmsError> {
        check_segment("project", &cfg.project)?;
        check_segment("location", &cfg.location)?;
        check_segment("key ring", &cfg.key_ring)?;
        check_segment("key", &cfg.key)?;
        let key_version = given(&cfg.key_version).map(str::to_owned);
        if let Some(v) = &key_version {
            check_segment("key version", v)?;
        }
        let key_id = format!(
            "projects/{}/locations/{}/keyRings/{}/cryptoKeys/{}",
            cfg.project, cfg.location, cfg.key_ring, cfg.key
        );
        let encrypt_name = match &key_version {
            Some(v) => format!("{key_id}/cryptoKeyVersions/{v}"),
            None => key_id.clone(),
        };
        let mut builder = KeyManagementService::builder()
            .with_credentials(credentials)
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
        let endpoint = match given(&cfg.endpoint) {
            Some(e) => {
                if !(e.starts_with("https://") || e.starts_with("http://")) {
                    return Err(KmsError::Config(format!(
                        "gcp endpoint {e:?} must be an http(s) URL, e.g. https://cloudkms.googleapis.com"
                    )));
                }
                let e = e.trim_end_matches('/').to_owned();
                builder = builder.with_endpoint(e.clone());
                e
            }
            None => DEFAULT_ENDPOINT.to_owned(),
        };
        // Building may ask the metadata server for the universe domain (ADC
        // on GCE/GKE): the caller bounds connecting
        // (`KmsConfig::build` does).
        let client = builder
            .build()
            .await
            .map_err(|e| KmsError::Config(format!("gcp Cloud KMS client: {}", error_chain(&e))))?;
        Ok(Self {
            client,
            key_id,
            encrypt_name,
            key_version,
            endpoint,
            timeout_secs: cfg.timeout_secs.max(1),
        })
    }

    /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn kms_name(&self) -> String {
        kms_name(&self.endpoint)
    }

    /// Runs one client call and maps its error.
    async fn call<T>(
        &self, op: Op, version: &str,
        f: impl std::future::Future<Output = Result<T, google_cloud_gax::error::Error>>,
    ) -> Result<T, KmsError> {
        f.await.map_err(|e| self.classify(op, version, e))
    }

    fn bad_response(&self, op: Op, detail: String) -> KmsError {
        bad_response(self.kms_name(), op.direction(), op.name(), &detail)
    }

    /// Maps a client error to a [`KmsError`]. Messages carry the service's
    /// status and message, never tokens, key files or key material.
    fn classify(&self, op: Op, version: &str, e: google_cloud_gax::error::Error) -> KmsError {
        let kms = self.kms_name();
        let version = version.to_owned();
        if e.is_timeout() {
            return KmsError::Timeout {
                kms,
                seconds: self.timeout_secs,
            };
        }
        if e.is_authentication() {
            return KmsError::AuthFailed {
                kms,
                detail: format!(
                    "could not get Google credentials: {} (check the service-account key file / GOOGLE_APPLICATION_CREDENTIALS, or the metadata server)",
                    error_chain(&e)
                ),
            };
        }
        if e.is_connect() || e.is_io() || e.is_transport() {
            return KmsError::Unreachable {
                kms,
                detail: error_chain(&e),
            };
        }
        if e.is_binding() {
            return KmsError::Config(format!(
                "{kms}: bad resource name {:?}: {}",
                self.key_id,
                error_chain(&e)
            ));
        }
        if e.is_deserialization() {
            return self.bad_response(op, error_chain(&e));
        }
        let http = e.http_status_code();
        let (code, message) = match e.status() {
            Some(s) => (Some(s.code), s.message.clone()),
            None => (None, String::new()),
        };
        let code = code.unwrap_or(match http {
            Some(401) => Code::Unauthenticated,
            Some(403) => Code::PermissionDenied,
            Some(404) => Code::NotFound,
            Some(400) => Code::InvalidArgument,
            Some(429) => Code::ResourceExhausted,
            Some(503) => Code::Unavailable,
            Some(s) if s >= 500 => Code::Internal,
            _ => Code::Unknown,
        });
        let detail = clean_message(&format!(
            "{}{}{}{}",
            http.map(|h| format!("HTTP {h} ")).unwrap_or_default(),
            code.name(),
            if message.is_empty() { "" } else { ": " },
            message
        ));
        match code {
            Code::Unauthenticated => KmsError::AuthFailed {
                kms,
                detail: format!("{detail} (the access token was rejected: check the key file is current and not disabled)"),
            },
            Code::PermissionDenied => KmsError::PermissionDenied {
                kms,
                operation: op.permission(),
                detail: format!(
                    "{detail} (grant {} on {} to the caller, or a role with {}, and check the API is enabled)",
                    op.role(),
                    self.key_id,
                    op.permission()
                ),
            },
            Code::NotFound => KmsError::KeyNotFound {
                kms,
                key: match op {
                    Op::Encrypt => self.encrypt_name.clone(),
                    Op::GetVersion => format!("{}/cryptoKeyVersions/{version}", self.key_id),
                    _ => self.key_id.clone(),
                },
            },
            Code::Unimplemented if !matches!(op, Op::Encrypt | Op::Decrypt) => KmsError::Unsupported {
                kms,
                operation: match op {
                    Op::GetKey | Op::ListVersions | Op::GetVersion => "list key versions",
                    _ => "rotate the key",
                },
                detail: format!("{detail} (this endpoint does not implement {})", op.name()),
            },
            Code::FailedPrecondition => KmsError::KeyVersionUnusable {
                kms,
                key: self.key_id.clone(),
                version,
                detail: format!("{detail} (enable the version, or pick another primary)"),
            },
            Code::InvalidArgument if op == Op::Decrypt => KmsError::UnwrapFailed { kms, detail },
            Code::Unavailable
            | Code::ResourceExhausted
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled => KmsError::Unreachable {
                kms,
                detail: format!("{detail} (unavailable or throttled)"),
            },
            _ => KmsError::Config(format!("{kms} refused {}: {detail}", op.name())),
        }
    }
}

/// `e` with `note` added to what it says; a failure after a change was
/// made (a version created) is never retried, so it becomes a
/// configuration error where it has no detail to carry the note.
fn with_note(e: KmsError, note: &str) -> KmsError {
    match e {
        KmsError::Unreachable { kms, detail } => KmsError::Unreachable {
            kms,
            detail: format!("{detail}; {note}"),
        },
        KmsError::AuthFailed { kms, detail } => KmsError::AuthFailed {
            kms,
            detail: format!("{detail}; {note}"),
        },
        KmsError::PermissionDenied {
            kms,
            operation,
            detail,
        } => KmsError::PermissionDenied {
            kms,
            operation,
            detail: format!("{detail}; {note}"),
        },
        KmsError::KeyVersionUnusable {
            kms,
            key,
            version,
            detail,
        } => KmsError::KeyVersionUnusable {
            kms,
            key,
            version,
            detail: format!("{detail}; {note}"),
        },
        KmsError::Unsupported {
            kms,
            operation,
            detail,
        } => KmsError::Unsupported {
            kms,
            operation,
            detail: format!("{detail}; {note}"),
        },
        KmsError::Config(m) => KmsError::Config(format!("{m}; {note}")),
        other => KmsError::Config(format!("{other}; {note}")),
    }
}

impl GcpKms {
    /// The version ID in a CryptoKeyVersion's resource name.
    fn version_id(&self, op: Op, name: &str) -> Result<String, KmsError> {
        name.strip_prefix(&self.key_id)
            .and_then(|r| r.strip_prefix("/cryptoKeyVersions/"))
            .filter(|v| !v.is_empty() && !v.contains('/') && v.len() <= 255)
            .map(str::to_owned)
            .ok_or_else(|| {
                self.bad_response(
                    op,
                    format!("\"name\" {name:?} is not a version of {}", self.key_id),
                )
            })
    }

    /// Every CryptoKeyVersion of the key (all pages), oldest first.
    async fn versions(&self) -> Result<Vec<KeyVersion>, KmsError> {
        let mut versions = Vec::new();
        let mut token = String::new();
        for _ in 0..MAX_VERSION_PAGES {
            let rsp = self
                .call(
                    Op::ListVersions,
                    "primary",
                    self.client
                        .list_crypto_key_versions()
                        .set_parent(self.key_id.clone())
                        .set_page_size(1000)
                        .set_page_token(token.clone())
                        .send(),
                )
                .await?;
            for v in &rsp.crypto_key_versions {
                versions.push(KeyVersion {
                    version: self.version_id(Op::ListVersions, &v.name)?,
                    created: v.create_time.as_ref().map(|t| t.seconds()),
                    can_unwrap: v.state == CryptoKeyVersionState::Enabled,
                });
            }
            if rsp.next_page_token.is_empty() {
                // Version IDs count up from 1 as versions are created.
                versions.sort_by_cached_key(|v| {
                    let n = v.version.parse::<u64>().ok();
                    (n.is_none(), n, v.version.clone())
                });
                return Ok(versions);
            }
            if rsp.next_page_token == token {
                return Err(
                    self.bad_response(Op::ListVersions, "the same nextPageToken twice".into())
                );
            }
            token = rsp.next_page_token;
        }
        Err(self.bad_response(
            Op::ListVersions,
            format!("more than {MAX_VERSION_PAGES} pages of versions"),
        ))
    }

    /// Waits (briefly) for a version being generated to be enabled.
    async fn generated(
        &self, mut version: CryptoKeyVersion, id: &str,
    ) -> Result<CryptoKeyVersion, KmsError> {
        for _ in 0..GENERATION_POLLS {
            if version.state != CryptoKeyVersionState::PendingGeneration {
                break;
            }
            tokio::time::sleep(GENERATION_POLL_INTERVAL).await;
            version = self
                .call(
                    Op::GetVersion,
                    id,
                    self.client
                        .get_crypto_key_version()
                        .set_name(version.name.clone())
                        .send(),
                )
                .await?;
        }
        Ok(version)
    }

    /// The `gcloud` flags that name this key.
    fn gcloud_key(&self) -> String {
        // projects/P/locations/L/keyRings/R/cryptoKeys/K
        let parts: Vec<&str> = self.key_id.split('/').collect();
        match parts[..] {
            [_, project, _, location, _, ring, _, key] => {
                format!("{key} --keyring {ring} --location {location} --project {project}")
            }
            _ => self.key_id.clone(),
        }
    }
}

#[async_trait]
impl KeyProvider for GcpKms {
    fn describe(&self) -> String {
        match &self.key_version {
            Some(v) => format!("{} (key {} version {v})", self.kms_name(), self.key_id),
            None => format!("{} (key {}, primary version)", self.kms_name(), self.key_id),
        }
    }

    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn handles(&self, key_ref: &KeyRef) -> bool {
        key_ref.provider == PROVIDER && key_ref.key_id == self.key_id
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        // The request's copy of the plaintext belongs to the client library;
        // ours is zeroized.
        let rsp = self
            .call(
                Op::Encrypt,
                self.key_version.as_deref().unwrap_or("primary"),
                self.client
                    .encrypt()
                    .set_name(self.encrypt_name.clone())
                    .set_plaintext(dek.as_bytes().to_vec())
                    .set_additional_authenticated_data(ctx.canonical_bytes())
                    .send(),
            )
            .await?;
        let prefix = format!("{}/cryptoKeyVersions/", self.key_id);
        let version = rsp
            .name
            .strip_prefix(&prefix)
            .filter(|v| !v.is_empty() && !v.contains('/') && v.len() <= 255)
            .ok_or_else(|| {
                self.bad_response(
                    Op::Encrypt,
                    format!(
                        "\"name\" {:?} is not a version of {}",
                        rsp.name, self.key_id
                    ),
                )
            })?
            .to_owned();
        if let Some(want) = &self.key_version {
            if *want != version {
                return Err(self.bad_response(
                    Op::Encrypt,
                    format!("encrypted with version {version}, not {want}"),
                ));
            }
        }
        if rsp.ciphertext.is_empty() || rsp.ciphertext.len() > 4096 {
            return Err(self.bad_response(
                Op::Encrypt,
                format!("ciphertext has {} bytes", rsp.ciphertext.len()),
            ));
        }
        Ok(WrappedDek {
            key_ref: KeyRef {
                provider: PROVIDER.into(),
                key_id: self.key_id.clone(),
                key_version: version,
            },
            blob: rsp.ciphertext.to_vec(),
        })
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        ensure_handles(self, &wrapped.key_ref)?;
        let rsp = self
            .call(
                Op::Decrypt,
                &wrapped.key_ref.key_version,
                self.client
                    .decrypt()
                    .set_name(self.key_id.clone())
                    .set_ciphertext(wrapped.blob.clone())
                    .set_additional_authenticated_data(ctx.canonical_bytes())
                    .send(),
            )
            .await?;
        Dek::from_slice(&rsp.plaintext[..]).map_err(|e| KmsError::UnwrapFailed {
            kms: self.kms_name(),
            detail: format!("{e} (not a kmsfs-wrapped DEK)"),
        })
    }

    /// The key's CryptoKeyVersions (their IDs, as key references record
    /// them), oldest first, each usable for unwrapping while ENABLED;
    /// `current` is the pinned version if there is one, else the primary.
    /// Needs cloudkms.cryptoKeys.get and cloudkms.cryptoKeyVersions.list
    /// (roles/cloudkms.viewer).
    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        let primary = match &self.key_version {
            Some(v) => Some((v.clone(), None)),
            None => {
                let key = self
                    .call(
                        Op::GetKey,
                        "primary",
                        self.client
                            .get_crypto_key()
                            .set_name(self.key_id.clone())
                            .send(),
                    )
                    .await?;
                match &key.primary {
                    Some(p) => Some((
                        self.version_id(Op::GetKey, &p.name)?,
                        p.create_time.as_ref().map(|t| t.seconds()),
                    )),
                    // No primary (disabled or destroyed): nothing encrypts.
                    None => None,
                }
            }
        };
        let versions = self.versions().await?;
        let (current, current_created) = match primary {
            Some((v, created)) => {
                let listed = versions
                    .iter()
                    .find(|k| k.version == v)
                    .and_then(|k| k.created);
                (Some(v), created.or(listed))
            }
            None => (None, None),
        };
        Ok(KeyVersions {
            current,
            current_created,
            versions,
        })
    }

    /// Creates a CryptoKeyVersion (cloudkms.cryptoKeyVersions.create) and
    /// makes it the primary (cloudkms.cryptoKeys.update); both are in
    /// roles/cloudkms.admin. Then [`key_versions`](Self::key_versions).
    /// Refused when pinned to a version: the new one would not encrypt.
    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        if let Some(v) = &self.key_version {
            let rotate_there = format!(
                "gcloud kms keys versions create --key {} --primary",
                self.gcloud_key()
            );
            return Err(support::pinned_version_does_not_rotate(
                self.kms_name(),
                self.key_id.rsplit('/').next().unwrap_or_default(),
                v,
                &rotate_there,
            ));
        }
        let created = self
            .call(
                Op::CreateVersion,
                "new",
                self.client
                    .create_crypto_key_version()
                    .set_parent(self.key_id.clone())
                    .set_crypto_key_version(CryptoKeyVersion::default())
                    .send(),
            )
            .await?;
        let id = self.version_id(Op::CreateVersion, &created.name)?;
        let make_primary = format!(
            "version {id} was created but is not the primary; make it the primary with \
             `gcloud kms keys update {} --primary-version {id}` once it is ENABLED",
            self.gcloud_key()
        );
        let created = self
            .generated(created, &id)
            .await
            .map_err(|e| with_note(e, &make_primary))?;
        if created.state != CryptoKeyVersionState::Enabled {
            return Err(KmsError::KeyVersionUnusable {
                kms: self.kms_name(),
                key: self.key_id.clone(),
                version: id.clone(),
                detail: format!(
                    "the new version is {}, not ENABLED; {make_primary}",
                    created.state.name().unwrap_or("in an unknown state")
                ),
            });
        }
        self.call(
            Op::UpdatePrimary,
            &id,
            self.client
                .update_crypto_key_primary_version()
                .set_name(self.key_id.clone())
                .set_crypto_key_version_id(id.clone())
                .send(),
        )
        .await
        .map_err(|e| with_note(e, &make_primary))?;
        self.key_versions().await
    }
}
