//! Azure Key Vault provider: wraps DEKs with `wrapKey`/`unwrapKey` and
//! RSA-OAEP-256 under an RSA key in a vault (or Managed HSM).
//!
//! # Binding the wrap context
//!
//! RSA-OAEP has no associated data, so the wrap context (the file ID) is
//! bound inside the wrapped plaintext instead. What Key Vault wraps is
//!
//! ```text
//! DEK (32) || SHA-256("kmsfs azure wrap v1\0" || ctx.canonical_bytes()) (32)
//! ```
//!
//! and unwrap compares the second half with the hash of the context it is
//! given, in constant time, before the DEK is used. A wrapped DEK copied into
//! another file's sidecar thus unwraps to a mismatch and fails with
//! [`KmsError::UnwrapFailed`]. The hash is not secret and need not be: it
//! only has to differ between contexts, and it is inside the RSA ciphertext,
//! so it cannot be changed without the key.
//!
//! # Versions and rotation
//!
//! Key references record the version (the last segment of the `kid`) each
//! wrap was made under. [`AzureKms::key_versions`] lists the key's versions
//! (`GET /keys/NAME/versions`, all pages) and the one new wraps use: the
//! latest (`GET /keys/NAME`), or the pinned one. [`AzureKms::rotate`] is
//! `POST /keys/NAME/rotate`; a provider pinned to a version refuses it, since
//! its wraps would not follow.
//!
//! # Credentials
//!
//! A service principal from `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and
//! `AZURE_CLIENT_SECRET` when all three are set; otherwise managed identity
//! (user-assigned with `AZURE_CLIENT_ID` when that alone is set, else
//! system-assigned). [`AzureKms::with_credential`] takes any
//! [`TokenCredential`] and client options (tests use it to trust a local
//! TLS mock).

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::http::{RequestContent, StatusCode};
use azure_identity::{
    ClientSecretCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential,
};
use azure_security_keyvault_keys::models::{KeyClientWrapKeyOptions, KeyOperationParameters};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions, ResourceId};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::support::{
    self, bad_response, clean_message, ensure_handles, error_chain, given, Direction,
};
use super::{KeyProvider, KeyRef, KeyVersion, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::crypto::{Dek, DEK_LEN};

const PROVIDER: &str = "azure";
const ALG: &str = "RSA-OAEP-256";
const BINDING_LEN: usize = 32;
const BINDING_DOMAIN: &[u8] = b"kmsfs azure wrap v1\0";
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Most versions of one key read: Key Vault pages 25 at a time, so a
/// `nextLink` that never ends stops here.
const MAX_VERSIONS: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// e.g. https://myvault.vault.azure.net
    pub vault_url: String,
    pub key_name: String,
    /// Empty or absent: the latest version.
    pub key_version: Option<String>,
    #[serde(default = "super::default_timeout_secs")]
    pub timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Wrap,
    Unwrap,
    /// `GET /keys/NAME`: the latest version.
    Get,
    /// `GET /keys/NAME/versions`.
    Versions,
    Rotate,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Wrap => "wrapKey",
            Op::Unwrap => "unwrapKey",
            Op::Get => "getKey",
            Op::Versions => "getKeyVersions",
            Op::Rotate => "rotateKey",
        }
    }

    /// What to grant when the vault refuses the operation (403).
    fn grant(self) -> String {
        match self {
            Op::Wrap | Op::Unwrap => format!(
                "grant keys/{} via an access policy, or the 'Key Vault Crypto Service Encryption User' RBAC role; check the vault firewall",
                self.name()
            ),
            Op::Get | Op::Versions => "grant keys/get and keys/list via an access policy, or an RBAC role with the data action Microsoft.KeyVault/vaults/keys/read ('Key Vault Reader' or 'Key Vault Crypto Service Encryption User'); check the vault firewall".into(),
            Op::Rotate => "grant keys/rotate (with keys/get and keys/list) via an access policy, or the 'Key Vault Crypto Officer' RBAC role (data action Microsoft.KeyVault/vaults/keys/rotate/action); check the vault firewall".into(),
        }
    }
}

/// The response body of wrapKey/unwrapKey, parsed here rather than by the
/// SDK's model so the unwrapped DEK lands in a zeroizing buffer.
#[derive(Deserialize)]
struct OpResult {
    kid: Option<String>,
    value: Option<String>,
}

/// The Azure Key Vault provider.
pub struct AzureKms {
    client: KeyClient,
    /// Vault URL without a trailing slash.
    vault_url: String,
    key_name: String,
    key_version: Option<String>,
    /// `<vault_url>/keys/<name>`, as written in key references.
    key_id: String,
}

fn binding(ctx: &WrapContext) -> [u8; BINDING_LEN] {
    let mut h = Sha256::new();
    h.update(BINDING_DOMAIN);
    h.update(ctx.canonical_bytes());
    h.finalize().into()
}

/// The vault, as messages name it.
fn kms_name(vault_url: &str) -> String {
    format!("Azure Key Vault {}", vault_url.trim().trim_end_matches('/'))
}

impl AzureConfig {
    pub(crate) fn kms_name(&self) -> String {
        kms_name(&self.vault_url)
    }
}

impl AzureKms {
    /// Connects with the environment's credentials (service principal from
    /// `AZURE_TENANT_ID`/`AZURE_CLIENT_ID`/`AZURE_CLIENT_SECRET`, workload
    /// identity from `AZURE_TENANT_ID`/`AZURE_CLIENT_ID`/
    /// `AZURE_FEDERATED_TOKEN_FILE`, else managed identity). Makes no
    /// request: the first wrap or `check` does.
    pub async fn connect(cfg: &AzureConfig) -> Result<Arc<dyn KeyProvider>, KmsError> {
        let credential = credential_from_env()?;
        Ok(Arc::new(Self::with_credential(cfg, credential, None)?))
    }

    /// Builds the provider with a given credential and client options (custom
    /// transport, API version, challenge-resource verification). Retries are
    /// always turned off: a generic wrapper retries retryable errors.
    pub fn with_credential(
        cfg: &AzureConfig, credential: Arc<dyn TokenCredential>, options: Option<KeyClientOptions>,
    ) -> Result<Self, KmsError> {
        let vault_url = cfg.vault_url.trim().trim_end_matches('/').to_owned();
        let url = azure_core::http::Url::parse(&vault_url).map_err(|e| {
            KmsError::Config(format!("azure vault_url {vault_url:?} is not a URL: {e}"))
        })?;
        if url.scheme() != "https" {
            return Err(KmsError::Config(format!(
                "azure vault_url {vault_url:?} must use https (e.g. https://NAME.vault.azure.net)"
            )));
        }
        if url.host_str().is_none() || url.path() != "/" || url.query().is_some() {
            return Err(KmsError::Config(format!(
                "azure vault_url {vault_url:?} must be just the vault address, e.g. https://NAME.vault.azure.net"
            )));
        }
        let key_name = cfg.key_name.trim().to_owned();
        if key_name.is_empty()
            || !key_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(KmsError::Config(format!(
                "azure key name {:?} is invalid: Key Vault key names are 1-127 letters, digits and '-'",
                cfg.key_name
            )));
        }
        let key_version = given(&cfg.key_version).map(str::to_owned);
        if let Some(v) = &key_version {
            if !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(KmsError::Config(format!(
                    "azure key version {v:?} is invalid (expected a hex version ID)"
                )));
            }
        }
        let mut options = options.unwrap_or_default();
        options.client_options.retry = azure_core::http::RetryOptions::none();
        let client = KeyClient::new(&vault_url, credential, Some(options)).map_err(|e| {
            KmsError::Config(format!(
                "azure Key Vault client for {vault_url}: {}",
                error_chain(&e)
            ))
        })?;
        Ok(Self {
            client,
            key_id: format!("{vault_url}/keys/{key_name}"),
            vault_url,
            key_name,
            key_version,
        })
    }

    /// The key ID written into key references: `<vault_url>/keys/<name>`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn kms_name(&self) -> String {
        kms_name(&self.vault_url)
    }

    fn request_body(value: &[u8]) -> RequestContent<KeyOperationParameters> {
        let mut body = Zeroizing::new(String::with_capacity(64 + value.len() * 2));
        body.push_str("{\"alg\":\"");
        body.push_str(ALG);
        body.push_str("\",\"value\":\"");
        B64URL.encode_string(value, &mut body);
        body.push_str("\"}");
        // The SDK's copy of the body is not ours to zeroize; ours is.
        RequestContent::from_slice(body.as_bytes())
    }

    /// Runs one SDK call and maps its error.
    async fn call<T>(
        &self, op: Op, version: &str, f: impl std::future::Future<Output = azure_core::Result<T>>,
    ) -> Result<T, KmsError> {
        f.await.map_err(|e| self.classify(op, version, e))
    }

    fn parse_result(&self, op: Op, body: &[u8]) -> Result<OpResult, KmsError> {
        serde_json::from_slice(body)
            .map_err(|e| self.bad_response(op, format!("response is not the expected JSON: {e}")))
    }

    fn bad_response(&self, op: Op, detail: String) -> KmsError {
        let direction = match op {
            Op::Unwrap => Direction::Unwrap,
            Op::Wrap | Op::Get | Op::Versions | Op::Rotate => Direction::Wrap,
        };
        bad_response(self.kms_name(), direction, op.name(), &detail)
    }

    /// Maps an SDK error to a [`KmsError`] with a message that says what to
    /// check. Messages carry the service's error code and message, never
    /// tokens, secrets or key material.
    fn classify(&self, op: Op, version: &str, e: azure_core::Error) -> KmsError {
        let kms = self.kms_name();
        let version = version.to_owned();
        match e.kind() {
            ErrorKind::HttpResponse {
                status,
                error_code,
                raw_response,
            } => {
                let service = raw_response
                    .as_ref()
                    .and_then(|r| serde_json::from_slice::<azure_core::error::ErrorResponse>(r.body().as_ref()).ok())
                    .and_then(|r| r.error);
                let message = service.as_ref().and_then(|d| d.message.clone()).unwrap_or_default();
                let inner = service
                    .as_ref()
                    .and_then(|d| d.inner_error.as_ref())
                    .and_then(|i| i.code.clone())
                    .unwrap_or_default();
                let code = error_code.clone().unwrap_or_default();
                let detail = clean_message(&format!(
                    "HTTP {} {}{}{}",
                    u16::from(*status),
                    code,
                    if inner.is_empty() { String::new() } else { format!("/{inner}") },
                    if message.is_empty() { String::new() } else { format!(": {message}") }
                ));
                let lower = message.to_ascii_lowercase();
                match *status {
                    StatusCode::Unauthorized => KmsError::AuthFailed {
                        kms,
                        detail: format!(
                            "{detail} (the Entra ID token was rejected: check AZURE_TENANT_ID is the vault's tenant, and the client secret or managed identity)"
                        ),
                    },
                    StatusCode::Forbidden
                        if lower.contains("disabled")
                            || lower.contains("expired")
                            || lower.contains("not yet valid")
                            || lower.contains("not permitted")
                            || code.eq_ignore_ascii_case("KeyDisabled") =>
                    {
                        KmsError::KeyVersionUnusable {
                            kms,
                            key: self.key_id.clone(),
                            version,
                            detail: match op {
                                Op::Wrap | Op::Unwrap => format!("{detail} (enable the key/version or allow {} in its key_ops)", op.name()),
                                Op::Get | Op::Versions | Op::Rotate => format!("{detail} (enable the key)"),
                            },
                        }
                    }
                    StatusCode::Forbidden => KmsError::PermissionDenied {
                        kms,
                        operation: op.name(),
                        detail: format!("{detail} ({})", op.grant()),
                    },
                    StatusCode::NotFound => KmsError::KeyNotFound {
                        kms,
                        key: if version == "latest" {
                            self.key_id.clone()
                        } else {
                            format!("{}/{version}", self.key_id)
                        },
                    },
                    StatusCode::BadRequest if op == Op::Unwrap => KmsError::UnwrapFailed { kms, detail },
                    StatusCode::BadRequest if op == Op::Wrap => KmsError::KeyVersionUnusable {
                        kms,
                        key: self.key_id.clone(),
                        version,
                        detail: format!("{detail} (the key must be an RSA key that supports {ALG} wrapKey)"),
                    },
                    s if u16::from(s) == 429 || u16::from(s) >= 500 => KmsError::Unreachable {
                        kms,
                        detail: format!("{detail} (throttled or unavailable)"),
                    },
                    _ => KmsError::Config(format!("{kms} refused {}: {detail}", op.name())),
                }
            }
            ErrorKind::Connection | ErrorKind::Io => KmsError::Unreachable {
                kms,
                detail: error_chain(&e),
            },
            ErrorKind::Credential => KmsError::AuthFailed {
                kms,
                detail: format!(
                    "could not get an Entra ID token: {} (set AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET, or run where a managed identity is assigned)",
                    error_chain(&e)
                ),
            },
            ErrorKind::DataConversion => self.bad_response(op, error_chain(&e)),
            _ => KmsError::Config(format!("{kms}: {} failed: {}", op.name(), error_chain(&e))),
        }
    }
}

impl AzureKms {
    /// The version a key identifier (`kid`) names, or why it names none of
    /// this key's.
    fn kid_version(&self, op: Op, kid: Option<&str>) -> Result<String, KmsError> {
        let Some(kid) = kid else {
            return Err(self.bad_response(op, format!("no \"kid\" in the {} response", op.name())));
        };
        let rid: ResourceId = kid.parse().map_err(|_| {
            self.bad_response(op, format!("\"kid\" {kid:?} is not a key identifier"))
        })?;
        if !rid.name.eq_ignore_ascii_case(&self.key_name) {
            return Err(self.bad_response(op, format!("\"kid\" {kid:?} names another key")));
        }
        rid.version
            .filter(|v| !v.is_empty() && v.len() <= 255)
            .ok_or_else(|| self.bad_response(op, format!("\"kid\" {kid:?} names no key version")))
    }

    /// The latest version of the key and when it was created (`GET
    /// /keys/NAME`).
    async fn latest_version(&self) -> Result<(String, Option<i64>), KmsError> {
        let key = self
            .call(Op::Get, "latest", self.client.get_key(&self.key_name, None))
            .await?
            .into_model()
            .map_err(|e| self.bad_response(Op::Get, error_chain(&e)))?;
        let kid = key.key.as_ref().and_then(|k| k.kid.as_deref());
        let version = self.kid_version(Op::Get, kid)?;
        let created = key
            .attributes
            .as_ref()
            .and_then(|a| a.created)
            .map(|t| t.unix_timestamp());
        Ok((version, created))
    }

    /// Every version of the key (`GET /keys/NAME/versions`, following
    /// `nextLink`), oldest first.
    async fn versions(&self) -> Result<Vec<KeyVersion>, KmsError> {
        use futures_core::Stream;
        let pager = self
            .client
            .list_key_properties_versions(&self.key_name, None)
            .map_err(|e| self.classify(Op::Versions, "latest", e))?;
        let mut pager = Box::pin(pager);
        let mut versions = Vec::new();
        while let Some(item) =
            std::future::poll_fn(|cx| Pin::as_mut(&mut pager).poll_next(cx)).await
        {
            let props = item.map_err(|e| self.classify(Op::Versions, "latest", e))?;
            if versions.len() >= MAX_VERSIONS {
                return Err(
                    self.bad_response(Op::Versions, format!("more than {MAX_VERSIONS} versions"))
                );
            }
            let version = self.kid_version(Op::Versions, props.kid.as_deref())?;
            let attributes = props.attributes.as_ref();
            versions.push(KeyVersion {
                version,
                created: attributes
                    .and_then(|a| a.created)
                    .map(|t| t.unix_timestamp()),
                // Key Vault always reports it; absent, the default (enabled).
                can_unwrap: attributes.and_then(|a| a.enabled).unwrap_or(true),
            });
        }
        // Undated versions (none expected) last; the order of the listing
        // is not specified.
        versions.sort_by(|a, b| {
            (a.created.is_none(), a.created, &a.version).cmp(&(
                b.created.is_none(),
                b.created,
                &b.version,
            ))
        });
        Ok(versions)
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Which credential the environment asks for, in the order of the Azure
/// SDKs' environment credential, then managed identity.
#[derive(Debug, PartialEq, Eq)]
enum EnvCredential {
    /// AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET.
    ServicePrincipal,
    /// AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE (AKS
    /// workload identity).
    WorkloadIdentity,
    /// User-assigned with AZURE_CLIENT_ID when only that is set, else
    /// system-assigned.
    ManagedIdentity { client_id: Option<String> },
}

/// The credential the variables `var` gives (blank ones count as unset)
/// ask for; a partial service principal is refused rather than silently
/// replaced by managed identity.
fn env_credential(var: impl Fn(&str) -> Option<String>) -> Result<EnvCredential, KmsError> {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let (tenant, client) = (set("AZURE_TENANT_ID"), set("AZURE_CLIENT_ID"));
    let (secret, token_file) = (
        set("AZURE_CLIENT_SECRET"),
        set("AZURE_FEDERATED_TOKEN_FILE"),
    );
    match (tenant && client, secret, token_file) {
        (true, true, _) => Ok(EnvCredential::ServicePrincipal),
        (true, false, true) => Ok(EnvCredential::WorkloadIdentity),
        (false, false, false) => Ok(EnvCredential::ManagedIdentity {
            client_id: var("AZURE_CLIENT_ID")
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty()),
        }),
        _ => Err(KmsError::Config(
            "azure credentials in the environment are incomplete: a service principal needs \
             AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET; workload identity needs \
             AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE; unset them all \
             (or keep only AZURE_CLIENT_ID, for a user-assigned identity) to use managed identity"
                .into(),
        )),
    }
}

/// The credential the environment names (see [`EnvCredential`]).
fn credential_from_env() -> Result<Arc<dyn TokenCredential>, KmsError> {
    match env_credential(|name| std::env::var(name).ok())? {
        EnvCredential::ServicePrincipal => {
            let tenant = env_nonempty("AZURE_TENANT_ID").unwrap_or_default();
            let client = env_nonempty("AZURE_CLIENT_ID").unwrap_or_default();
            let secret = Zeroizing::new(std::env::var("AZURE_CLIENT_SECRET").unwrap_or_default());
            let cred = ClientSecretCredential::new(&tenant, client, Secret::new(secret.to_string()), None).map_err(|e| {
                KmsError::Config(format!(
                    "azure service principal from AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET: {}",
                    error_chain(&e)
                ))
            })?;
            Ok(cred as Arc<dyn TokenCredential>)
        }
        EnvCredential::WorkloadIdentity => {
            // The SDK reads the three variables itself.
            let cred = WorkloadIdentityCredential::new(None).map_err(|e| {
                KmsError::Config(format!(
                    "azure workload identity from AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_FEDERATED_TOKEN_FILE: {}",
                    error_chain(&e)
                ))
            })?;
            Ok(cred as Arc<dyn TokenCredential>)
        }
        EnvCredential::ManagedIdentity { client_id } => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.map(UserAssignedId::ClientId),
                ..Default::default()
            };
            let cred = ManagedIdentityCredential::new(Some(options)).map_err(|e| {
                KmsError::Config(format!("azure managed identity: {}", error_chain(&e)))
            })?;
            Ok(cred as Arc<dyn TokenCredential>)
        }
    }
}

#[async_trait]
impl KeyProvider for AzureKms {
    fn describe(&self) -> String {
        match &self.key_version {
            Some(v) => format!("{} (key {} version {v})", self.kms_name(), self.key_name),
            None => format!(
                "{} (key {}, latest version)",
                self.kms_name(),
                self.key_name
            ),
        }
    }

    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn handles(&self, key_ref: &KeyRef) -> bool {
        key_ref.provider == PROVIDER && key_ref.key_id.trim_end_matches('/') == self.key_id
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        let mut plain = Zeroizing::new([0u8; DEK_LEN + BINDING_LEN]);
        plain[..DEK_LEN].copy_from_slice(dek.as_bytes());
        plain[DEK_LEN..].copy_from_slice(&binding(ctx));
        let options = KeyClientWrapKeyOptions {
            key_version: self.key_version.clone(),
            ..Default::default()
        };
        let rsp = self
            .call(
                Op::Wrap,
                self.key_version.as_deref().unwrap_or("latest"),
                self.client.wrap_key(
                    &self.key_name,
                    Self::request_body(&plain[..]),
                    Some(options),
                ),
            )
            .await?;
        let body = rsp.into_body();
        let result = self.parse_result(Op::Wrap, body.as_ref())?;
        let value = result.value.ok_or_else(|| {
            self.bad_response(Op::Wrap, "no \"value\" in the wrapKey response".into())
        })?;
        let blob = B64URL
            .decode(value.trim_end_matches('='))
            .map_err(|_| self.bad_response(Op::Wrap, "\"value\" is not base64url".into()))?;
        if blob.is_empty() || blob.len() > 2048 {
            return Err(
                self.bad_response(Op::Wrap, format!("wrapped key has {} bytes", blob.len()))
            );
        }
        let kid = result.kid.ok_or_else(|| {
            self.bad_response(Op::Wrap, "no \"kid\" in the wrapKey response".into())
        })?;
        let rid: ResourceId = kid.parse().map_err(|_| {
            self.bad_response(Op::Wrap, format!("\"kid\" {kid:?} is not a key identifier"))
        })?;
        let version = rid
            .version
            .filter(|v| !v.is_empty() && v.len() <= 255)
            .ok_or_else(|| {
                self.bad_response(Op::Wrap, format!("\"kid\" {kid:?} names no key version"))
            })?;
        if !rid.name.eq_ignore_ascii_case(&self.key_name) {
            return Err(self.bad_response(Op::Wrap, format!("\"kid\" {kid:?} names another key")));
        }
        if let Some(want) = &self.key_version {
            if !want.eq_ignore_ascii_case(&version) {
                return Err(self.bad_response(
                    Op::Wrap,
                    format!("\"kid\" {kid:?} names another version than {want}"),
                ));
            }
        }
        Ok(WrappedDek {
            key_ref: KeyRef {
                provider: PROVIDER.into(),
                key_id: self.key_id.clone(),
                key_version: version,
            },
            blob,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        ensure_handles(self, &wrapped.key_ref)?;
        let version = wrapped.key_ref.key_version.as_str();
        if version.is_empty() || !version.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(KmsError::UnwrapFailed {
                kms: self.kms_name(),
                detail: format!(
                    "the sidecar names key version {version:?}, not a Key Vault version ID"
                ),
            });
        }
        let rsp = self
            .call(
                Op::Unwrap,
                version,
                self.client.unwrap_key(
                    &self.key_name,
                    version,
                    Self::request_body(&wrapped.blob),
                    None,
                ),
            )
            .await?;
        let body = rsp.into_body();
        let result = self.parse_result(Op::Unwrap, body.as_ref())?;
        let value = Zeroizing::new(result.value.ok_or_else(|| {
            self.bad_response(Op::Unwrap, "no \"value\" in the unwrapKey response".into())
        })?);
        let mut plain = Zeroizing::new(Vec::with_capacity(DEK_LEN + BINDING_LEN));
        B64URL
            .decode_vec(value.trim_end_matches('='), &mut plain)
            .map_err(|_| self.bad_response(Op::Unwrap, "\"value\" is not base64url".into()))?;
        if plain.len() != DEK_LEN + BINDING_LEN {
            return Err(KmsError::UnwrapFailed {
                kms: self.kms_name(),
                detail: format!(
                    "unwrapped {} bytes, expected {} (not a kmsfs-wrapped DEK)",
                    plain.len(),
                    DEK_LEN + BINDING_LEN
                ),
            });
        }
        if !bool::from(plain[DEK_LEN..].ct_eq(&binding(ctx))) {
            return Err(KmsError::UnwrapFailed {
                kms: self.kms_name(),
                detail: "the wrapped DEK is bound to another file ID".into(),
            });
        }
        Dek::from_slice(&plain[..DEK_LEN]).map_err(|e| KmsError::UnwrapFailed {
            kms: self.kms_name(),
            detail: e.to_string(),
        })
    }

    /// The key's versions (as key references record them: the last segment
    /// of their `kid`), oldest first, each usable for unwrapping while
    /// enabled; `current` is the pinned version if there is one, else the
    /// latest. Needs keys/get and keys/list (RBAC: Microsoft.KeyVault/
    /// vaults/keys/read).
    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        let versions;
        let (current, current_created) = match &self.key_version {
            None => {
                let (latest, created) = self.latest_version().await?;
                versions = self.versions().await?;
                let listed = versions.iter().find(|k| k.version == latest);
                let created = created.or_else(|| listed.and_then(|k| k.created));
                (latest, created)
            }
            // Pinned: as the service spells it, which is what wraps record.
            Some(pin) => {
                versions = self.versions().await?;
                match versions
                    .iter()
                    .find(|k| k.version.eq_ignore_ascii_case(pin))
                {
                    Some(k) => (k.version.clone(), k.created),
                    None => (pin.clone(), None),
                }
            }
        };
        Ok(KeyVersions {
            current: Some(current),
            current_created,
            versions,
        })
    }

    /// `POST /keys/NAME/rotate` (keys/rotate; RBAC: Key Vault Crypto
    /// Officer), then [`key_versions`](Self::key_versions). Refused when
    /// pinned to a version: the new version would not wrap anything.
    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        if let Some(v) = &self.key_version {
            let rotate_there = format!(
                "az keyvault key rotate --vault-name VAULT --name {}",
                self.key_name
            );
            return Err(support::pinned_version_does_not_rotate(
                self.kms_name(),
                &self.key_name,
                v,
                &rotate_there,
            ));
        }
        let key = self
            .call(
                Op::Rotate,
                "latest",
                self.client.rotate_key(&self.key_name, None),
            )
            .await?
            .into_model()
            .map_err(|e| self.bad_response(Op::Rotate, error_chain(&e)))?;
        let rotated =
            self.kid_version(Op::Rotate, key.key.as_ref().and_then(|k| k.kid.as_deref()))?;
        let mut state = self.key_versions().await?;
        // The rotation's own answer names the new latest version, should a
        // read right after it still see the previous one.
        if state.current.as_deref() != Some(rotated.as_str()) {
            let created = key
                .attributes
                .as_ref()
                .and_then(|a| a.created)
                .map(|t| t.unix_timestamp());
            if !state.versions.iter().any(|k| k.version == rotated) {
                state.versions.push(KeyVersion {
                    version: rotated.clone(),
                    created,
                    can_unwrap: key
                        .attributes
                        .as_ref()
                        .and_then(|a| a.enabled)
                        .unwrap_or(true),
                });
            }
            state.current = Some(rotated);
            state.current_created = created;
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[&str]) -> Result<EnvCredential, KmsError> {
        let vars: Vec<String> = vars.iter().map(|v| v.to_string()).collect();
        env_credential(move |name| {
            vars.iter()
                .any(|v| v == name)
                .then(|| format!("{name}-value"))
        })
    }

    #[test]
    fn the_environment_chooses_the_credential() {
        use EnvCredential::*;
        let sp = ["AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"];
        assert_eq!(with(&sp).unwrap(), ServicePrincipal);
        let wi = [
            "AZURE_TENANT_ID",
            "AZURE_CLIENT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
        ];
        assert_eq!(with(&wi).unwrap(), WorkloadIdentity);
        assert_eq!(with(&[]).unwrap(), ManagedIdentity { client_id: None });
        assert_eq!(
            with(&["AZURE_CLIENT_ID", "AZURE_TENANT_ID"][..1]).unwrap(),
            ManagedIdentity {
                client_id: Some("AZURE_CLIENT_ID-value".into())
            }
        );
        assert_eq!(
            with(&["AZURE_TENANT_ID"]).unwrap(),
            ManagedIdentity { client_id: None }
        );
        for partial in [
            &["AZURE_CLIENT_SECRET"][..],
            &["AZURE_TENANT_ID", "AZURE_CLIENT_ID"],
            &["AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE"],
        ] {
            let e = with(partial).unwrap_err().to_string();
            assert!(e.contains("incomplete"), "{partial:?}: {e}");
        }
    }
}
