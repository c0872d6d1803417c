//! Where a KMS key lives and how to reach it: the provider settings that
//! `KmsConfig::build` turns into a connected [`KeyProvider`].

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::local::{KeyringError, LocalKms};
use super::{KeyProvider, KmsError, KmsRuntime};

/// Why a KMS could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Kms(#[from] KmsError),
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

impl KmsConfig {
    /// Connects to (or opens) the KMS this configuration names.
    pub fn build(&self, rt: &KmsRuntime) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        let _ = rt;
        Ok(match self {
            KmsConfig::Local { key_file, key } => Arc::new(LocalKms::open(key_file, key)?),
            #[cfg(feature = "vault")]
            KmsConfig::Vault(c) => rt.block_on(super::vault::VaultKms::connect(c))?,
            #[cfg(feature = "aws")]
            KmsConfig::Aws(c) => rt.block_on(super::aws::AwsKms::connect(c))?,
            #[cfg(feature = "azure")]
            KmsConfig::Azure(c) => rt.block_on(super::azure::AzureKms::connect(c))?,
            #[cfg(feature = "gcp")]
            KmsConfig::Gcp(c) => rt.block_on(super::gcp::GcpKms::connect(c))?,
        })
    }
}
