//! `kmsfs init`: makes a directory a backing directory, with its root policy.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use kmsfs::config::{Config, CONFIG_VERSION};
use kmsfs::format::{BlockGeometry, CipherSuite};
use kmsfs::policy::Policy;

use super::absolute;
use super::kms_args::{self, KmsArgs};

#[derive(Args)]
pub struct InitArgs {
    backing: PathBuf,
    /// AEAD that encrypts the blocks of new files.
    #[arg(long, default_value = kms_args::DEFAULT_CIPHER.name(), value_parser = kms_args::cipher_suite())]
    cipher: CipherSuite,
    /// Plaintext block size: a power of two from 4096 to 1048576.
    #[arg(long, default_value_t = 4096)]
    block_size: u64,
    // Last (see KmsArgs).
    #[command(flatten)]
    kms: Box<KmsArgs>,
}

pub fn init(a: InitArgs) -> Result<()> {
    let backing = absolute(&a.backing)?;
    BlockGeometry::from_size(a.block_size).map_err(|_| {
        anyhow!(
            "--block-size {} is not a power of two from 4096 to 1048576",
            a.block_size
        )
    })?;
    if backing.exists() && !backing.is_dir() {
        bail!("{} exists and is not a directory", backing.display());
    }
    if Config::path(&backing).exists() {
        bail!(
            "{} is already a kmsfs backing directory; refusing to overwrite its configuration",
            backing.display()
        );
    }
    std::fs::create_dir_all(&backing)
        .with_context(|| format!("cannot create {}", backing.display()))?;
    let kms = a.kms.to_config(&backing)?;
    let cfg = Config {
        format_version: CONFIG_VERSION,
        block_size: a.block_size,
        policies: vec![Policy {
            dir: "/".into(),
            cipher: a.cipher,
            mandatory: true,
            kms,
        }],
        retired: vec![],
    };
    cfg.save(&backing)?;
    eprintln!(
        "kmsfs: initialised {} ({}, {}-byte blocks)",
        backing.display(),
        a.cipher.name(),
        a.block_size
    );
    Ok(())
}
