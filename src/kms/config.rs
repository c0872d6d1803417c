//! Where a KMS key lives and how to reach it: the provider settings that
//! `KmsConfig::build` turns into a connected [`KeyProvider`], with
//! connecting and every call bounded by the configured timeout.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::instrumented::{within, Instrumented, RetryPolicy};
use super::local::{KeyringError, LocalKms};
use super::{KeyProvider, KmsError, KmsRuntime};
use crate::metrics::Metrics;

/// Why a KMS could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Kms(#[from] KmsError),
}

impl ConnectError {
    /// Whether trying again later can help (the KMS was unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConnectError::Kms(e) if e.is_retryable())
    }
}

/// Which KMS key wraps DEKs, by provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum KmsConfig {
    Local {
        /// Keyring file, absolute, outside the backing directory.
        key_file: PathBuf,
        /// Key name in the keyring.
        key: String,
    },
    #[cfg(feature = "vault")]
    Vault(super::vault::VaultConfig),
    #[cfg(feature = "aws")]
    Aws(super::aws::AwsConfig),
    #[cfg(feature = "azure")]
    Azure(super::azure::AzureConfig),
    #[cfg(feature = "gcp")]
    Gcp(super::gcp::GcpConfig),
}

/// Connecting makes up to this many calls in a row (a login or credential
/// fetch, then a read of the key), each allowed the per-call timeout.
const CONNECT_CALLS: u32 = 2;

impl KmsConfig {
    /// How long one call to this KMS may take: the provider's `timeout_secs`
    /// (at least 1 s). The local keyring's calls are in-memory, so it keeps
    /// the default, which only guards against a stuck lock.
    pub fn timeout(&self) -> Duration {
        let secs = match self {
            KmsConfig::Local { .. } => super::default_timeout_secs(),
            #[cfg(feature = "vault")]
            KmsConfig::Vault(c) => c.timeout_secs,
            #[cfg(feature = "aws")]
            KmsConfig::Aws(c) => c.timeout_secs,
            #[cfg(feature = "azure")]
            KmsConfig::Azure(c) => c.timeout_secs,
            #[cfg(feature = "gcp")]
            KmsConfig::Gcp(c) => c.timeout_secs,
        };
        Duration::from_secs(secs.max(1))
    }

    /// Connects to (or opens) the KMS this configuration names. Each call of
    /// the provider is bounded by [`timeout`](Self::timeout) and tried once:
    /// what one-off commands (checks) use.
    pub fn build(&self, rt: &KmsRuntime) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        rt.block_on(self.connect())
    }

    /// [`build`](Self::build), for callers already on a runtime.
    pub async fn connect(&self) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        Ok(Instrumented::bounded(self.open().await?, self.timeout()))
    }

    /// Connects; each call of the provider is bounded by
    /// [`timeout`](Self::timeout), retried by `retry` and recorded in
    /// `metrics`: what a mount uses.
    pub fn build_instrumented(
        &self,
        rt: &KmsRuntime,
        metrics: &Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        let inner = rt.block_on(self.open())?;
        Ok(Instrumented::wrap(
            inner,
            metrics.clone(),
            retry,
            self.timeout(),
        ))
    }

    /// The connected provider, its calls not yet bounded. Connecting is.
    async fn open(&self) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        let timeout = self.timeout();
        Ok(match self {
            KmsConfig::Local { key_file, key } => Arc::new(LocalKms::open(key_file, key)?),
            #[cfg(feature = "vault")]
            KmsConfig::Vault(c) => {
                connect_within(timeout, || c.kms_name(), super::vault::VaultKms::connect(c)).await?
            }
            #[cfg(feature = "aws")]
            KmsConfig::Aws(c) => {
                connect_within(timeout, || c.kms_name(), super::aws::AwsKms::connect(c)).await?
            }
            #[cfg(feature = "azure")]
            KmsConfig::Azure(c) => {
                connect_within(timeout, || c.kms_name(), super::azure::AzureKms::connect(c)).await?
            }
            #[cfg(feature = "gcp")]
            KmsConfig::Gcp(c) => {
                connect_within(timeout, || c.kms_name(), super::gcp::GcpKms::connect(c)).await?
            }
        })
    }
}

/// Runs a provider's `connect`, bounded by [`CONNECT_CALLS`] calls of
/// `timeout` each: the one bound on connecting (logins, credential
/// discovery, key reads), which providers do not bound themselves.
pub async fn connect_within<T>(
    timeout: Duration,
    kms: impl FnOnce() -> String,
    connect: impl Future<Output = Result<T, KmsError>>,
) -> Result<T, KmsError> {
    within(timeout * CONNECT_CALLS, kms, connect).await
}
