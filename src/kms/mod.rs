//! The joint between the filesystem and any KMS: one narrow trait,
//! [`KeyProvider`], that wraps and unwraps DEKs under a key the KMS holds,
//! with the file ID bound into every wrap as encryption context.
//!
//! Providers are async because the remote ones (Vault transit, AWS KMS, Azure
//! Key Vault, GCP Cloud KMS) are HTTP SDKs. The KMS layer owns a small tokio
//! runtime ([`KmsRuntime`]); FUSE threads hand work to it and never run an
//! executor themselves, so one slow KMS call blocks no other request.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod config;
#[cfg(feature = "gcp")]
pub mod gcp;
pub mod instrumented;
pub mod intermediate;
pub mod local;
pub mod named;
pub mod pool;
pub mod probe;
mod support;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
#[cfg(feature = "vault")]
pub mod vault;

use std::future::Future;

use async_trait::async_trait;

use crate::crypto::Dek;
pub use crate::format::{KeyRef, WrappedDek};

/// Single calls in flight at once when a provider without a batch API
/// serves a batch (`wrap_many`, `unwrap_many`): AWS KMS, say, where a
/// rewrap of many files is two calls per file.
pub const PARALLEL_CALLS: usize = 16;

/// Default per-call timeout of the remote providers, in seconds.
pub fn default_timeout_secs() -> u64 {
    10
}

/// What is bound into a wrap besides the DEK: unwrapping with another
/// context fails. A file's DEK is bound to its file ID, so a wrapped DEK
/// copied into another file's sidecar does not unwrap; in format 2 also to
/// its volume's ID, so a file copied into another volume does not either.
/// A volume's configuration key is bound to the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WrapContext {
    /// A file's DEK in a format 1 header.
    FileV1 { file_id: [u8; 16] },
    /// A file's DEK in a format 2 header.
    File {
        file_id: [u8; 16],
        volume_id: [u8; 16],
    },
    /// A volume configuration's key.
    VolumeKey { volume_id: [u8; 16] },
    /// An intermediate key of directory key mode (`kms::intermediate`),
    /// bound to its ID (which holds its creation time) and its volume.
    IntermediateKey {
        volume_id: [u8; 16],
        ik_id: [u8; 16],
    },
}

impl WrapContext {
    pub fn file_v1(file_id: [u8; 16]) -> Self {
        WrapContext::FileV1 { file_id }
    }

    pub fn file(file_id: [u8; 16], volume_id: [u8; 16]) -> Self {
        WrapContext::File { file_id, volume_id }
    }

    pub fn volume_key(volume_id: [u8; 16]) -> Self {
        WrapContext::VolumeKey { volume_id }
    }

    pub fn intermediate_key(volume_id: [u8; 16], ik_id: [u8; 16]) -> Self {
        WrapContext::IntermediateKey { volume_id, ik_id }
    }

    /// Key/value pairs for KMSs that take a map (AWS EncryptionContext).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        match self {
            WrapContext::FileV1 { file_id } => vec![("kmsfs-file-id", hex::encode(file_id))],
            WrapContext::File { file_id, volume_id } => vec![
                ("kmsfs-file-id", hex::encode(file_id)),
                ("kmsfs-volume-id", hex::encode(volume_id)),
            ],
            WrapContext::VolumeKey { volume_id } => {
                vec![("kmsfs-volume-key", hex::encode(volume_id))]
            }
            WrapContext::IntermediateKey { volume_id, ik_id } => vec![
                ("kmsfs-intermediate-key", hex::encode(ik_id)),
                ("kmsfs-volume-id", hex::encode(volume_id)),
            ],
        }
    }

    /// Canonical bytes for KMSs that take opaque associated data: the pairs
    /// as `name=hex`, joined by `;` (format 1's is `kmsfs-file-id=HEX`).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let pairs: Vec<String> = self
            .pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        pairs.join(";").into_bytes()
    }
}

/// Why a KMS operation failed. Messages name the KMS and what to check, and
/// never contain key material or credentials.
#[derive(Clone, Debug, thiserror::Error)]
pub enum KmsError {
    #[error("{kms} is unreachable: {detail}; check its address, network and TLS settings")]
    Unreachable { kms: String, detail: String },
    #[error("{kms} did not answer within {seconds} s; check that it is up and not overloaded")]
    Timeout { kms: String, seconds: u64 },
    #[error(
        "{kms} rejected the credentials: {detail}; check the token or credentials and their expiry"
    )]
    AuthFailed { kms: String, detail: String },
    #[error(
        "{kms} denied {operation}: {detail}; check the policy/IAM permissions for that operation"
    )]
    PermissionDenied {
        kms: String,
        operation: &'static str,
        detail: String,
    },
    #[error("{kms} has no key {key:?}; check the key name (and region/namespace)")]
    KeyNotFound { kms: String, key: String },
    #[error("{kms}: version {version:?} of key {key:?} cannot be used: {detail}")]
    KeyVersionUnusable {
        kms: String,
        key: String,
        version: String,
        detail: String,
    },
    #[error("{kms} could not unwrap the DEK: {detail} (wrong key, tampered wrapped DEK, or a sidecar moved from another file)")]
    UnwrapFailed { kms: String, detail: String },
    #[error("no configured KMS can unwrap a DEK wrapped by {provider:?} key {key:?}; add that KMS to the configuration")]
    NoProvider { provider: String, key: String },
    #[error("{kms} cannot {operation} through kmsfs: {detail}")]
    Unsupported {
        kms: String,
        operation: &'static str,
        detail: String,
    },
    #[error("KMS configuration: {0}")]
    Config(String),
}

impl KmsError {
    /// No configured KMS holds the key `key_ref` names.
    pub fn no_provider(key_ref: &KeyRef) -> Self {
        KmsError::NoProvider {
            provider: key_ref.provider.clone(),
            key: key_ref.key_id.clone(),
        }
    }

    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            KmsError::Unreachable { .. } => "unreachable",
            KmsError::Timeout { .. } => "timeout",
            KmsError::AuthFailed { .. } => "auth_failed",
            KmsError::PermissionDenied { .. } => "permission_denied",
            KmsError::KeyNotFound { .. } => "key_not_found",
            KmsError::KeyVersionUnusable { .. } => "key_version_unusable",
            KmsError::UnwrapFailed { .. } => "unwrap_failed",
            KmsError::NoProvider { .. } => "no_provider",
            KmsError::Unsupported { .. } => "unsupported",
            KmsError::Config(_) => "config",
        }
    }

    /// Whether trying the same call again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KmsError::Unreachable { .. } | KmsError::Timeout { .. }
        )
    }
}

/// One version of a KMS key, as its KMS reports it. Never key bytes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyVersion {
    /// As key references record it (`KeyRef::key_version`), e.g. "3".
    pub version: String,
    /// When it was created, in seconds since the Unix epoch, if known.
    pub created: Option<i64>,
    /// Whether the KMS still unwraps with it (false: disabled, destroyed,
    /// below Vault's `min_decryption_version`, ...).
    pub can_unwrap: bool,
}

/// What a KMS says of the key a provider wraps with: its versions and which
/// one new wraps use.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyVersions {
    /// The version new wraps are made under, as key references record it;
    /// `None` when the KMS keeps versions inside its ciphertext and never
    /// names them (AWS KMS): then headers cannot tell which version wrapped
    /// them, and the KMS unwraps every version for ever.
    pub current: Option<String>,
    /// When the version new wraps use was created (for AWS: the last
    /// rotation, or the key's creation), seconds since the Unix epoch.
    pub current_created: Option<i64>,
    /// Every version the KMS reports, oldest first.
    pub versions: Vec<KeyVersion>,
}

/// One configured key in one KMS.
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// Human-readable name for messages and metrics, e.g. `local keyring /etc/k (key default)`.
    fn describe(&self) -> String;

    /// Provider kind as written in key references ("local", "vault", ...).
    fn kind(&self) -> &'static str;

    /// Whether this provider can unwrap DEKs wrapped under `key_ref`.
    fn handles(&self, key_ref: &KeyRef) -> bool;

    /// Whether a new DEK is wrapped without a KMS round trip (a local
    /// keyring; an intermediate key in directory mode): then nothing is
    /// gained by pre-wrapping DEKs for it (`kms::pool`).
    fn wraps_locally(&self) -> bool {
        self.kind() == "local"
    }

    /// Whether `key_ref` names the key this provider wraps new DEKs with
    /// (any version). A provider that can unwrap several keys narrows this.
    fn is_current_key(&self, key_ref: &KeyRef) -> bool {
        self.handles(key_ref)
    }

    /// A fresh DEK and its wrapped form. Providers with a native
    /// generate-data-key call override this.
    async fn generate_dek(&self, ctx: &WrapContext) -> Result<(Dek, WrappedDek), KmsError> {
        let dek = Dek::generate();
        let wrapped = self.wrap(&dek, ctx).await?;
        Ok((dek, wrapped))
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError>;

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError>;

    /// Wraps many DEKs; providers with a batch endpoint override this to
    /// make one request per batch instead of one per DEK. Otherwise up to
    /// [`PARALLEL_CALLS`] single calls are in flight at once. One answer
    /// per item, in order.
    async fn wrap_many(&self, items: &[(&Dek, WrapContext)]) -> Vec<Result<WrappedDek, KmsError>> {
        use futures_util::stream::{self, StreamExt};
        let calls: Vec<_> = items.iter().map(|(dek, ctx)| self.wrap(dek, ctx)).collect();
        stream::iter(calls).buffered(PARALLEL_CALLS).collect().await
    }

    /// The key's versions, and which one new wraps use (`kmsfs keys list`,
    /// `keys status`, `rotate --due`). Never key bytes.
    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        Err(KmsError::Unsupported {
            kms: self.describe(),
            operation: "list key versions",
            detail: "this provider does not report key versions".into(),
        })
    }

    /// Makes a new version of the key, which new wraps use from now on;
    /// older versions keep unwrapping. Returns the key's state after it.
    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        Err(KmsError::Unsupported {
            kms: self.describe(),
            operation: "rotate the key",
            detail: "rotate it with the KMS's own tools".into(),
        })
    }

    /// Unwraps many DEKs; providers with a batch endpoint override this to
    /// make one request per batch instead of one per DEK. Otherwise up to
    /// [`PARALLEL_CALLS`] single calls are in flight at once.
    async fn unwrap_many(&self, items: &[(WrappedDek, WrapContext)]) -> Vec<Result<Dek, KmsError>> {
        use futures_util::stream::{self, StreamExt};
        let calls: Vec<_> = items.iter().map(|(w, ctx)| self.unwrap(w, ctx)).collect();
        stream::iter(calls).buffered(PARALLEL_CALLS).collect().await
    }

    /// Health check for `kmsfs kms status`: reachable, authenticated, key
    /// usable. The default is a wrap/unwrap round trip; providers may use a
    /// cheaper read of the key's metadata.
    async fn check(&self) -> Result<(), KmsError> {
        let ctx = WrapContext::file_v1([0u8; 16]);
        let (dek, wrapped) = self.generate_dek(&ctx).await?;
        let back = self.unwrap(&wrapped, &ctx).await?;
        if back.as_bytes() != dek.as_bytes() {
            return Err(KmsError::UnwrapFailed {
                kms: self.describe(),
                detail: "round trip returned a different key".into(),
            });
        }
        Ok(())
    }
}

/// The KMS layer's own executor. Invariant: FUSE threads only `spawn` onto it
/// or `block_on` from outside it (CLI), never from a runtime thread.
pub struct KmsRuntime {
    rt: tokio::runtime::Runtime,
}

impl KmsRuntime {
    pub fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kmsfs-kms")
            .enable_all()
            .build()?;
        Ok(Self { rt })
    }

    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Runs `f` in the background.
    pub fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f);
    }

    /// Polls `f` once on the calling thread (inside this runtime's context)
    /// and hands it to the runtime only if it has to wait. A local keyring
    /// or a DEK cache hit thus costs no thread hop; a remote KMS call never
    /// holds the calling FUSE thread.
    pub fn run_or_spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut f = Box::pin(f);
        let _ctx = self.rt.enter();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if f.as_mut().poll(&mut cx).is_pending() {
            self.rt.spawn(f);
        }
    }
}
