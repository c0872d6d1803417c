//! `kmsfs init`: makes a directory a backing directory (a volume), with its
//! root policy; its KMS provider goes into the trusted configuration.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use kmsfs::config::{Volume, VolumeConfig};
use kmsfs::format::block::BlockLayout;
use kmsfs::format::{BlockGeometry, CipherSuite};
use kmsfs::kms::KmsRuntime;
use kmsfs::policy::{KeyMode, Policy};

use super::kms_args::{self, KmsArgs};
use super::{absolute, trust};

/// How a new volume's files are encrypted (`init`, and `migrate` of a
/// directory that is not a volume yet).
#[derive(Args, Clone, Copy)]
pub struct FormatArgs {
    /// AEAD that encrypts the blocks of new files.
    #[arg(long, default_value = kms_args::DEFAULT_CIPHER.name(), value_parser = kms_args::cipher_suite())]
    pub cipher: CipherSuite,
    /// Plaintext block size: a power of two from 4096 to 1048576.
    #[arg(long, default_value_t = 4096)]
    pub block_size: u64,
    /// per-file: the KMS wraps each new file's DEK. directory: the KMS
    /// wraps an intermediate key now and then, and new files' DEKs are
    /// wrapped under it (no KMS call per create; docs/KEY_LIFECYCLE.md).
    #[arg(long, default_value = "per-file")]
    pub key_mode: KeyMode,
}

#[derive(Args)]
pub struct InitArgs {
    backing: PathBuf,
    #[command(flatten)]
    format: FormatArgs,
    // Last (see KmsArgs).
    #[command(flatten)]
    kms: Box<KmsArgs>,
}

pub fn init(a: InitArgs) -> Result<()> {
    let backing = absolute(&a.backing)?;
    create_volume(&backing, &a.format, &a.kms, true)
}

/// Makes `backing` (created if needed) a volume whose root policy is the
/// key `kms` names; `mandatory: false` lets the plaintext files already
/// there be read as they are (`kmsfs migrate`).
pub(super) fn create_volume(
    backing: &Path, format: &FormatArgs, kms: &KmsArgs, mandatory: bool,
) -> Result<()> {
    let FormatArgs {
        cipher,
        block_size,
        key_mode,
    } = *format;
    BlockGeometry::from_size(block_size, BlockLayout::V2).map_err(|_| {
        anyhow!(
            "--block-size {} is not a power of two from 4096 to 1048576",
            block_size
        )
    })?;
    if backing.exists() && !backing.is_dir() {
        bail!("{} exists and is not a directory", backing.display());
    }
    std::fs::create_dir_all(backing)
        .with_context(|| format!("cannot create {}", backing.display()))?;
    // Held until the configuration is written: two inits (or an init and
    // an upgrade) on one directory never write over each other's volume.
    let _lock = VolumeConfig::lock(backing)?;
    if std::fs::symlink_metadata(VolumeConfig::path(backing)).is_ok() {
        bail!(
            "{} is already a kmsfs backing directory; refusing to overwrite its configuration",
            backing.display()
        );
    }
    let key = kms.to_key(backing)?;
    let mut root = Policy::new("/".into(), cipher, mandatory, key);
    root.key_mode = key_mode;
    let rt = KmsRuntime::new()?;
    Volume::create(backing, &trust::load()?, &rt, block_size, vec![root], false)?;
    eprintln!(
        "kmsfs: initialised {} ({}, {}-byte blocks)",
        backing.display(),
        cipher.name(),
        block_size
    );
    Ok(())
}
