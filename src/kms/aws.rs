//! AWS KMS provider.
//!
//! New DEKs come from `GenerateDataKey` (AES_256) under one symmetric KMS key;
//! unwrapping is `Decrypt` with the key pinned. The wrap context goes in as
//! the KMS `EncryptionContext`, so a wrapped DEK moved to another file's
//! sidecar does not decrypt. The configured key ID or alias is resolved once
//! at connect (`DescribeKey`) to the key ARN, which is what key references
//! record; AWS embeds the key material version in the ciphertext blob, so
//! `key_version` stays empty.
//!
//! Rotation is AWS's own (`RotateKeyOnDemand`, or automatic rotation): the
//! key ARN stays, new wraps use the newest key material and every older
//! material keeps unwrapping. [`AwsKms::key_versions`] names the materials
//! as described there.
//!
//! Credentials come from the SDK's default chain (environment, shared
//! profile files — optionally a named profile —, web identity, ECS/EC2
//! roles), optionally with a role assumed on top (with an external ID). The
//! SDK's own retries are off: callers retry errors that `is_retryable()`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyState, KeyUsageType};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::support::{bad_response, clean_message, ensure_handles, error_chain, Direction};
use super::{KeyProvider, KeyRef, KeyVersion, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::crypto::Dek;

const PROVIDER: &str = "aws";
/// The version name of a key's first key material (see
/// [`AwsKms::key_versions`]).
pub const INITIAL_VERSION: &str = "initial";
/// Most pages of `ListKeyRotations` read (100 rotations a page by default).
const MAX_ROTATION_PAGES: usize = 100;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Key ID, key ARN, alias name (alias/...) or alias ARN.
    pub key_id: String,
    pub region: Option<String>,
    /// Custom endpoint (LocalStack, moto).
    pub endpoint: Option<String>,
    /// Allow a plain http:// endpoint (a dev server on loopback). Set only
    /// in the trusted configuration; refused otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    /// Named profile from the shared config files.
    pub profile: Option<String>,
    /// Role to assume on top of the base credentials.
    pub assume_role_arn: Option<String>,
    pub external_id: Option<String>,
    /// The account a volume's key ARNs may name. A key ID or alias name
    /// resolves in the credentials' own account; an ARN names its account,
    /// and a volume (which whoever writes the backing directory can change)
    /// must not choose one, so ARNs are accepted for this account only.
    pub account: Option<String>,
    #[serde(default = "super::default_timeout_secs")]
    pub timeout_secs: u64,
}

/// The account of a key or alias ARN (`arn:PARTITION:kms:REGION:ACCOUNT:...`),
/// or None for a key ID or alias name.
pub fn arn_account(key_id: &str) -> Option<&str> {
    key_id.trim().strip_prefix("arn:")?.split(':').nth(3)
}

/// One AWS KMS key, resolved to its ARN.
pub struct AwsKms {
    client: aws_sdk_kms::Client,
    /// The key's ARN as DescribeKey returned it; recorded in key references.
    key_arn: String,
    /// What the configuration named (ID, ARN or alias), for messages.
    configured: String,
    region: String,
    timeout_secs: u64,
}

/// The KMS operations this provider calls, as IAM names them.
#[derive(Clone, Copy)]
enum Op {
    DescribeKey,
    GenerateDataKey,
    Encrypt,
    Decrypt,
    ListKeyRotations,
    RotateKeyOnDemand,
}

impl Op {
    fn direction(self) -> Direction {
        match self {
            Op::Decrypt => Direction::Unwrap,
            Op::DescribeKey
            | Op::GenerateDataKey
            | Op::Encrypt
            | Op::ListKeyRotations
            | Op::RotateKeyOnDemand => Direction::Wrap,
        }
    }

    fn iam(self) -> &'static str {
        match self {
            Op::DescribeKey => "kms:DescribeKey",
            Op::GenerateDataKey => "kms:GenerateDataKey",
            Op::Encrypt => "kms:Encrypt",
            Op::Decrypt => "kms:Decrypt",
            Op::ListKeyRotations => "kms:ListKeyRotations",
            Op::RotateKeyOnDemand => "kms:RotateKeyOnDemand",
        }
    }

    /// What kmsfs does with the call, for [`KmsError::Unsupported`]; only
    /// the key-version calls, which a key or an endpoint may not support.
    fn unsupported_action(self) -> Option<&'static str> {
        match self {
            Op::ListKeyRotations => Some("list key versions"),
            Op::RotateKeyOnDemand => Some("rotate the key"),
            _ => None,
        }
    }
}

impl AwsConfig {
    /// The key being connected to, as messages name it before its region is
    /// known.
    pub(crate) fn kms_name(&self) -> String {
        format!("AWS KMS (key {})", self.key_id)
    }
}

impl AwsKms {
    /// Builds the client and resolves the configured key to its ARN. Region
    /// and credential discovery can wait on the EC2 metadata service: the
    /// caller bounds connecting ([`KmsConfig::build`](super::config::KmsConfig::build) does).
    pub async fn connect(cfg: &AwsConfig) -> Result<Arc<dyn KeyProvider>, KmsError> {
        Ok(Arc::new(Self::open(cfg).await?))
    }

    /// [`connect`](Self::connect) returning the concrete type.
    async fn open(cfg: &AwsConfig) -> Result<AwsKms, KmsError> {
        if cfg.key_id.trim().is_empty() {
            return Err(KmsError::Config(
                "aws: key_id is empty; pass --aws-key-id (key ID, key ARN or alias/NAME)".into(),
            ));
        }
        if let Some(account) = arn_account(&cfg.key_id) {
            if cfg.account.as_deref() != Some(account) {
                return Err(KmsError::Config(format!(
                    "aws: key {} is an ARN in account {account}, which this provider's trusted \
                     definition does not name; a volume must not choose the account its keys \
                     live in. Set account = \"{account}\" in that definition if the key is \
                     yours, or name the key by ID or alias/NAME",
                    cfg.key_id.trim()
                )));
            }
        }
        if cfg.external_id.is_some() && cfg.assume_role_arn.is_none() {
            return Err(KmsError::Config(
                "aws: an external ID is only used when assuming a role; also pass --aws-assume-role ROLE_ARN".into(),
            ));
        }
        // The SDK's own timeouts are a backstop for callers outside the
        // timeout layer, which gives up on a call after the same time.
        let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .operation_attempt_timeout(timeout)
            .operation_timeout(timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(p) = cfg.profile.as_deref().filter(|p| !p.is_empty()) {
            loader = loader.profile_name(p);
        }
        if let Some(r) = cfg.region.as_deref().filter(|r| !r.is_empty()) {
            loader = loader.region(Region::new(r.to_owned()));
        }
        let sdk = loader.load().await;
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            return Err(KmsError::Config(
                "aws: no AWS region configured; pass --aws-region, set AWS_REGION, or set a region in the AWS profile".into(),
            ));
        };
        if sdk.credentials_provider().is_none() {
            return Err(KmsError::Config(
                "aws: this build has no AWS credential provider".into(),
            ));
        }
        let mut kms_conf = aws_sdk_kms::config::Builder::from(&sdk);
        if let Some(role) = cfg.assume_role_arn.as_deref().filter(|r| !r.is_empty()) {
            // STS is reached at its regular endpoint (or AWS_ENDPOINT_URL_STS),
            // not at the custom KMS endpoint.
            let mut b = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("kmsfs")
                .configure(&sdk)
                .region(Region::new(region.clone()));
            if let Some(x) = cfg.external_id.as_deref() {
                b = b.external_id(x);
            }
            let provider = b.build().await;
            kms_conf = kms_conf.credentials_provider(provider);
        }
        if let Some(url) = cfg.endpoint.as_deref().filter(|u| !u.is_empty()) {
            kms_conf = kms_conf.endpoint_url(url);
        }
        let client = aws_sdk_kms::Client::from_conf(kms_conf.build());
        let mut kms = AwsKms {
            client,
            key_arn: String::new(),
            configured: cfg.key_id.clone(),
            region,
            timeout_secs: timeout.as_secs(),
        };
        let meta = kms.describe_key().await?;
        let Some(arn) = meta.arn().map(str::to_owned) else {
            return Err(kms.bad_response(Op::DescribeKey, "no key ARN"));
        };
        kms.key_arn = arn;
        Ok(kms)
    }

    /// The key's ARN, as recorded in key references.
    pub fn key_arn(&self) -> &str {
        &self.key_arn
    }

    fn kms_name(&self) -> String {
        format!("AWS KMS ({})", self.region)
    }

    /// The key to name in requests: the ARN once known.
    fn key(&self) -> &str {
        if self.key_arn.is_empty() {
            &self.configured
        } else {
            &self.key_arn
        }
    }

    fn key_label(&self) -> String {
        if self.key_arn.is_empty() || self.configured == self.key_arn {
            self.key().to_owned()
        } else {
            format!("{} ({})", self.configured, self.key_arn)
        }
    }

    fn context_map(ctx: &WrapContext) -> HashMap<String, String> {
        ctx.pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    /// Runs one SDK call and maps its error.
    async fn call<T, E, F>(&self, op: Op, f: F) -> Result<T, KmsError>
    where
        F: Future<Output = Result<T, SdkError<E, aws_sdk_kms::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        f.await.map_err(|e| self.map_err(op, e))
    }

    fn map_err<E>(
        &self, op: Op, e: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
    ) -> KmsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let kms = self.kms_name();
        match &e {
            SdkError::TimeoutError(_) => KmsError::Timeout {
                kms,
                seconds: self.timeout_secs,
            },
            SdkError::DispatchFailure(d) => {
                if d.is_timeout() {
                    return KmsError::Timeout {
                        kms,
                        seconds: self.timeout_secs,
                    };
                }
                let detail = error_chain(&e);
                let lower = detail.to_ascii_lowercase();
                if d.is_other() && (lower.contains("credential") || lower.contains("identity")) {
                    KmsError::AuthFailed {
                        kms,
                        detail: format!(
                            "no usable AWS credentials ({detail}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
                             a profile (--aws-profile / AWS_PROFILE), or run with an IAM role"
                        ),
                    }
                } else {
                    KmsError::Unreachable {
                        kms,
                        detail: format!("{} failed: {detail}", op.iam()),
                    }
                }
            }
            SdkError::ResponseError(_) => KmsError::Unreachable {
                kms,
                detail: format!("{}: unreadable response: {}", op.iam(), error_chain(&e)),
            },
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = e.code().unwrap_or("").to_owned();
                let msg = clean_message(e.message().unwrap_or(""));
                let detail = if msg.is_empty() {
                    code.clone()
                } else {
                    format!("{code}: {msg}")
                };
                self.map_service(op, status, &code, detail)
            }
            // Construction failures: a bad request or configuration.
            _ => KmsError::Config(format!(
                "{}: {} could not be sent: {}",
                kms,
                op.iam(),
                error_chain(&e)
            )),
        }
    }

    fn map_service(&self, op: Op, status: u16, code: &str, detail: String) -> KmsError {
        if let Some(e) = self.map_unsupported(op, code, &detail) {
            return e;
        }
        let kms = self.kms_name();
        match code {
            "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "IncompleteSignatureException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "ExpiredToken"
            | "SignatureDoesNotMatch"
            | "MissingAuthenticationToken"
            | "MissingAuthenticationTokenException"
            | "RequestExpired" => KmsError::AuthFailed {
                kms,
                detail: format!(
                    "{detail} (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN or the profile, \
                     that the session has not expired, and the machine's clock)"
                ),
            },
            "AccessDeniedException" | "AccessDenied" => KmsError::PermissionDenied {
                kms,
                operation: op.iam(),
                detail: format!("{detail} (key {})", self.key_label()),
            },
            "NotFoundException" => KmsError::KeyNotFound {
                kms: format!("{kms}: {detail}; keys and aliases are per region and account, this is region {}", self.region),
                key: self.key_label(),
            },
            "InvalidArnException" => KmsError::KeyNotFound {
                kms: format!("{kms}: {detail}"),
                key: self.key_label(),
            },
            "DisabledException" | "KMSInvalidStateException" | "InvalidKeyUsageException" => {
                KmsError::KeyVersionUnusable {
                    kms,
                    key: self.key_label(),
                    version: "current".into(),
                    detail: format!("{detail}; enable the key (or cancel its deletion) and check its key usage is ENCRYPT_DECRYPT"),
                }
            }
            "InvalidCiphertextException" | "IncorrectKeyException" => KmsError::UnwrapFailed { kms, detail },
            "ThrottlingException" | "LimitExceededException" => KmsError::Unreachable {
                kms,
                detail: format!("{} throttled: {detail}", op.iam()),
            },
            "DependencyTimeoutException" => KmsError::Timeout {
                kms,
                seconds: self.timeout_secs,
            },
            "KMSInternalException" | "KeyUnavailableException" | "ServiceUnavailableException" => {
                KmsError::Unreachable {
                    kms,
                    detail: format!("{} failed on the server side: {detail}", op.iam()),
                }
            }
            _ if status >= 500 || status == 429 => KmsError::Unreachable {
                kms,
                detail: format!("{} failed with HTTP {status}: {detail}", op.iam()),
            },
            _ => KmsError::Config(format!("{kms}: {} rejected (HTTP {status}): {detail}", op.iam())),
        }
    }

    /// The answers that say a key-version call cannot be made: the key does
    /// not support it (asymmetric, HMAC, custom key store, imported material,
    /// a multi-Region replica), its on-demand rotation quota is used up, or
    /// the endpoint does not implement the operation (an emulator).
    fn map_unsupported(&self, op: Op, code: &str, detail: &str) -> Option<KmsError> {
        let action = op.unsupported_action()?;
        let lower = detail.to_ascii_lowercase();
        let hint = match code {
            "UnsupportedOperationException" => format!(
                "AWS KMS rotates only symmetric encryption keys whose key material it generated, \
                 outside custom key stores, and a multi-Region key only through its primary \
                 (key {})",
                self.key_label()
            ),
            "LimitExceededException" if matches!(op, Op::RotateKeyOnDemand) => format!(
                "AWS KMS allows a limited number of on-demand rotations per key and key {} has \
                 used them up; enable automatic rotation (`aws kms enable-key-rotation`) instead",
                self.key_label()
            ),
            "UnknownOperationException"
            | "InvalidAction"
            | "NotImplemented"
            | "NotImplementedException" => format!(
                "this endpoint does not implement {} (an emulator such as moto or LocalStack \
                 that is too old?)",
                op.iam()
            ),
            _ if lower.contains("not been implemented") || lower.contains("not implemented") => {
                format!("this endpoint does not implement {}", op.iam())
            }
            _ => return None,
        };
        Some(KmsError::Unsupported {
            kms: self.kms_name(),
            operation: action,
            detail: if detail.is_empty() {
                hint
            } else {
                format!("{detail}; {hint}")
            },
        })
    }

    async fn describe_key(&self) -> Result<aws_sdk_kms::types::KeyMetadata, KmsError> {
        let out = self
            .call(
                Op::DescribeKey,
                self.client.describe_key().key_id(self.key()).send(),
            )
            .await?;
        out.key_metadata
            .ok_or_else(|| self.bad_response(Op::DescribeKey, "no key metadata"))
    }

    fn bad_response(&self, op: Op, detail: &str) -> KmsError {
        bad_response(self.kms_name(), op.direction(), op.iam(), detail)
    }

    /// Moves a plaintext key out of an SDK blob into a `Dek`, zeroizing the blob.
    fn take_dek(&self, plaintext: Option<Blob>, op: Op) -> Result<Dek, KmsError> {
        let Some(blob) = plaintext else {
            return Err(self.bad_response(op, "no plaintext key"));
        };
        let mut raw = blob.into_inner();
        let dek = Dek::from_slice(&raw)
            .map_err(|e| self.bad_response(op, &format!("a {}-byte key: {e}", raw.len())));
        raw.zeroize();
        dek
    }

    /// The wrapped DEK of an answer to `op`.
    fn take_ciphertext(&self, blob: Option<Blob>, op: Op) -> Result<Vec<u8>, KmsError> {
        let blob = blob.map(Blob::into_inner).unwrap_or_default();
        if blob.is_empty() {
            return Err(self.bad_response(op, "no ciphertext"));
        }
        Ok(blob)
    }

    fn key_ref(&self) -> KeyRef {
        KeyRef {
            provider: PROVIDER.into(),
            key_id: self.key_arn.clone(),
            key_version: String::new(),
        }
    }

    /// Every rotation of the key (`ListKeyRotations`, all pages), oldest
    /// first.
    async fn rotations(&self) -> Result<Vec<aws_sdk_kms::types::RotationsListEntry>, KmsError> {
        let mut rotations = Vec::new();
        let mut marker: Option<String> = None;
        for _ in 0..MAX_ROTATION_PAGES {
            let out = self
                .call(
                    Op::ListKeyRotations,
                    self.client
                        .list_key_rotations()
                        .key_id(self.key())
                        .set_marker(marker.clone())
                        .send(),
                )
                .await?;
            rotations.extend(out.rotations.unwrap_or_default());
            if !out.truncated {
                // Dated oldest first; undated ones (none expected) last.
                rotations.sort_by_key(|r| r.rotation_date().map_or(i64::MAX, |d| d.secs()));
                return Ok(rotations);
            }
            match out.next_marker.filter(|m| !m.is_empty()) {
                Some(m) if marker.as_deref() != Some(m.as_str()) => marker = Some(m),
                _ => {
                    return Err(self.bad_response(
                        Op::ListKeyRotations,
                        "a truncated page without a new NextMarker",
                    ))
                }
            }
        }
        Err(self.bad_response(
            Op::ListKeyRotations,
            &format!("more than {MAX_ROTATION_PAGES} pages of rotations"),
        ))
    }
}

#[async_trait]
impl KeyProvider for AwsKms {
    fn describe(&self) -> String {
        format!("{} key {}", self.kms_name(), self.key_label())
    }

    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn handles(&self, key_ref: &KeyRef) -> bool {
        key_ref.provider == PROVIDER && key_ref.key_id == self.key_arn
    }

    async fn generate_dek(&self, ctx: &WrapContext) -> Result<(Dek, WrappedDek), KmsError> {
        let mut out = self
            .call(
                Op::GenerateDataKey,
                self.client
                    .generate_data_key()
                    .key_id(self.key())
                    .key_spec(DataKeySpec::Aes256)
                    .set_encryption_context(Some(Self::context_map(ctx)))
                    .send(),
            )
            .await?;
        let dek = self.take_dek(out.plaintext.take(), Op::GenerateDataKey)?;
        let blob = self.take_ciphertext(out.ciphertext_blob.take(), Op::GenerateDataKey)?;
        Ok((
            dek,
            WrappedDek {
                key_ref: self.key_ref(),
                blob,
            },
        ))
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        // The SDK takes the plaintext by value; this copy lives in the
        // request until it is sent.
        let out = self
            .call(
                Op::Encrypt,
                self.client
                    .encrypt()
                    .key_id(self.key())
                    .plaintext(Blob::new(dek.as_bytes().to_vec()))
                    .set_encryption_context(Some(Self::context_map(ctx)))
                    .send(),
            )
            .await?;
        let blob = self.take_ciphertext(out.ciphertext_blob, Op::Encrypt)?;
        Ok(WrappedDek {
            key_ref: self.key_ref(),
            blob,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        ensure_handles(self, &wrapped.key_ref)?;
        let mut out = self
            .call(
                Op::Decrypt,
                self.client
                    .decrypt()
                    .key_id(&wrapped.key_ref.key_id)
                    .ciphertext_blob(Blob::new(wrapped.blob.clone()))
                    .set_encryption_context(Some(Self::context_map(ctx)))
                    .send(),
            )
            .await?;
        self.take_dek(out.plaintext.take(), Op::Decrypt)
    }

    /// AWS KMS keeps a key's key materials inside its ciphertexts and never
    /// names them in key references (their `key_version` is empty): so
    /// `current` is `None`, and `current_created` is when the newest
    /// material was made (the last rotation, else the key's creation).
    ///
    /// The versions are the key's materials, oldest first:
    /// - [`INITIAL_VERSION`] (`initial`): the material the key was created
    ///   with, dated by the key's `CreationDate`;
    /// - `rotation-N` for the N-th rotation (on demand or automatic, from
    ///   `ListKeyRotations`), dated by its `RotationDate`, followed by
    ///   `:KEY_MATERIAL_ID` when AWS reports the material's ID
    ///   (`rotation-2:1a2b...`).
    ///
    /// AWS unwraps under every material as long as the key is enabled, so
    /// `can_unwrap` is the key's `Enabled` for all of them. Needs
    /// kms:DescribeKey and kms:ListKeyRotations.
    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        let meta = self.describe_key().await?;
        let rotations = self.rotations().await?;
        let can_unwrap = meta.enabled();
        let created = meta.creation_date().map(|d| d.secs());
        let mut versions = Vec::with_capacity(rotations.len() + 1);
        versions.push(KeyVersion {
            version: INITIAL_VERSION.into(),
            created,
            can_unwrap,
        });
        for (i, r) in rotations.iter().enumerate() {
            let mut version = format!("rotation-{}", i + 1);
            if let Some(id) = r.key_material_id().filter(|id| !id.is_empty()) {
                version.push(':');
                version.push_str(id);
            }
            versions.push(KeyVersion {
                version,
                created: r.rotation_date().map(|d| d.secs()),
                can_unwrap,
            });
        }
        let current_created = versions.iter().rev().find_map(|v| v.created).or(created);
        Ok(KeyVersions {
            current: None,
            current_created,
            versions,
        })
    }

    /// `RotateKeyOnDemand` (needs kms:RotateKeyOnDemand), then
    /// [`key_versions`](Self::key_versions). AWS rotates in the background:
    /// the answer may not list the new rotation yet, though new wraps use
    /// the new material as soon as the rotation completes.
    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        self.call(
            Op::RotateKeyOnDemand,
            self.client.rotate_key_on_demand().key_id(self.key()).send(),
        )
        .await?;
        self.key_versions().await
    }

    async fn check(&self) -> Result<(), KmsError> {
        let meta = self.describe_key().await?;
        let unusable = |detail: String| KmsError::KeyVersionUnusable {
            kms: self.kms_name(),
            key: self.key_label(),
            version: "current".into(),
            detail,
        };
        if !meta.enabled() {
            let state = meta
                .key_state()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|| "unknown".into());
            return Err(unusable(format!(
                "the key is not enabled (state {state}); enable it with `aws kms enable-key`"
            )));
        }
        if let Some(state) = meta.key_state() {
            if *state != KeyState::Enabled {
                return Err(unusable(format!("the key is in state {}", state.as_str())));
            }
        }
        match meta.key_usage() {
            Some(KeyUsageType::EncryptDecrypt) | None => {}
            Some(u) => {
                return Err(unusable(format!(
                    "its key usage is {}, kmsfs needs a symmetric ENCRYPT_DECRYPT key",
                    u.as_str()
                )))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(key_id: &str, account: Option<&str>) -> AwsConfig {
        AwsConfig {
            key_id: key_id.into(),
            region: Some("us-east-1".into()),
            endpoint: Some("http://127.0.0.1:9".into()),
            allow_http: true,
            profile: None,
            assume_role_arn: None,
            external_id: None,
            account: account.map(String::from),
            timeout_secs: 1,
        }
    }

    #[test]
    fn arn_accounts() {
        assert_eq!(
            arn_account("arn:aws:kms:eu-west-1:111122223333:key/1234"),
            Some("111122223333")
        );
        assert_eq!(
            arn_account("arn:aws:kms:eu-west-1:111122223333:alias/x"),
            Some("111122223333")
        );
        assert_eq!(arn_account("1234abcd-12ab-34cd-56ef-1234567890ab"), None);
        assert_eq!(arn_account("alias/x"), None);
    }

    /// A volume naming a key ARN in an account the trusted definition does
    /// not name is refused before any request is made.
    #[tokio::test]
    async fn a_key_arn_in_another_account_is_refused() {
        let arn = "arn:aws:kms:us-east-1:999988887777:key/attacker";
        for account in [None, Some("111122223333")] {
            let Err(err) = AwsKms::open(&config(arn, account)).await else {
                panic!("an ARN in another account was accepted")
            };
            assert!(matches!(err, KmsError::Config(_)), "{err}");
            assert!(err.to_string().contains("999988887777"), "{err}");
        }
    }

    /// An ARN typed by the operator records its account in the provider's
    /// trusted definition, so that it is then accepted.
    #[test]
    fn a_typed_arn_records_its_account() {
        let arn = "arn:aws:kms:us-east-1:111122223333:key/mine";
        let (def, key) = crate::kms::config::KmsConfig::Aws(config(arn, None)).split("aws");
        assert_eq!(def.settings["account"].as_str(), Some("111122223333"));
        match def.resolve(&key).unwrap() {
            crate::kms::config::KmsConfig::Aws(c) => {
                assert_eq!(c.account.as_deref(), Some("111122223333"))
            }
            _ => panic!("not aws"),
        }
    }
}
