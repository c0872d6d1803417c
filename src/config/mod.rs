//! Configuration, in two places that are trusted differently.
//!
//! - [`trusted`]: the mount side's `/etc/kmsfs/kmsfs.toml` (or `--config`,
//!   `KMSFS_CONFIG`): the KMS providers, by name — addresses, keyring
//!   files, credentials, TLS. Only root or its owner can change it.
//! - [`volume`]: the backing directory's `.kmsfs-config.toml`: block size
//!   and directory policies, naming keys by provider name and key ID only,
//!   authenticated by a MAC under a key the root policy's KMS key wraps.
//! - [`open`]: a volume opened for use — its keys connected through the
//!   trusted providers and its MAC checked — and changed (`policy set`).
//! - [`legacy`] and [`upgrade`]: format 1 configurations, which named KMS
//!   settings in the backing directory, and their one-command upgrade.

pub mod legacy;
pub mod open;
pub mod trusted;
pub mod upgrade;
pub mod volume;

use std::path::PathBuf;

pub use crate::kms::config::{ConnectError, KeySpec, KmsConfig};
pub use open::{open_volume, ActivePolicy, Calls, Volume};
pub use trusted::{TrustedConfig, TrustedError};
pub use volume::VolumeConfig;

use crate::format::names::CONFIG_FILE;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not a kmsfs backing directory (no {CONFIG_FILE}); run `kmsfs init {0} --kms local --key-file FILE` first")]
    NotInitialized(PathBuf),
    #[error("backing directory {0} does not exist or is not a directory")]
    NoBacking(PathBuf),
    #[error("{0} is already initialised; refusing to overwrite its configuration")]
    AlreadyInitialized(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid kmsfs configuration: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("{0} is a format 1 configuration, which keeps KMS addresses and keyring paths in the backing directory where anyone who can write it can change them; run `kmsfs upgrade BACKING` once to move them into the trusted configuration (it shows them first: check that they are your KMSs)")]
    FormatOne(PathBuf),
    #[error("{path} sets `{field}`, a KMS setting; KMS settings belong in the trusted configuration ([providers.NAME] in /etc/kmsfs/kmsfs.toml or $KMSFS_CONFIG), and policies name keys as key = {{ provider = \"NAME\", id = \"KEY\" }}; move it there")]
    KmsSettingInVolume { path: PathBuf, field: String },
    #[error("{0} failed authentication: it was changed outside kmsfs (or restored from another volume); refusing to use it. Restore it from a backup, or check who can write the backing directory")]
    Tampered(PathBuf),
    #[error("{path}: the volume's key does not unwrap under {key}, the root policy's key ({detail}): either that provider is not the keyring or KMS key this volume was created with (check its definition in the trusted configuration), or the volume's configuration was replaced")]
    VolumeKeyRefused {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error(transparent)]
    Trusted(#[from] TrustedError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

impl ConfigError {
    /// Whether trying again later can help (a KMS was unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConfigError::Connect(e) if e.is_retryable())
    }
}
