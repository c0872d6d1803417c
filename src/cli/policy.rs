//! `kmsfs policy`: which key protects new files under which directory.
//! `policy status` looks at the files themselves, so it is in `inspect`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use kmsfs::format::CipherSuite;
use kmsfs::kms::KmsRuntime;
use kmsfs::policy::{normalize_dir, Policy};

use super::kms_args::{self, KmsArgs};
use super::{inspect, load_config, print_json};

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Set the key (and cipher) for new files under DIR.
    Set {
        backing: PathBuf,
        dir: String,
        /// AEAD that encrypts the blocks of new files.
        #[arg(long, default_value = kms_args::DEFAULT_CIPHER.name(), value_parser = kms_args::cipher_suite())]
        cipher: CipherSuite,
        /// Let files without a sidecar (plaintext already there) be read and
        /// written as they are; new files are still encrypted.
        #[arg(long)]
        not_mandatory: bool,
        /// Save without a wrap/unwrap round trip against the KMS.
        #[arg(long)]
        no_check: bool,
        // Last (see KmsArgs).
        #[command(flatten)]
        kms: Box<KmsArgs>,
    },
    /// List all policies as JSON.
    List { backing: PathBuf },
    /// Show the policy governing DIR as JSON.
    Show { backing: PathBuf, dir: String },
    /// Remove the policy of DIR (files keep their keys; the key stays usable).
    Unset { backing: PathBuf, dir: String },
    /// Per policy: how many files are wrapped under its current key, under
    /// another key (created before a policy change), or are plaintext.
    Status { backing: PathBuf },
}

pub fn policy(action: PolicyCmd) -> Result<()> {
    match action {
        PolicyCmd::Set {
            backing,
            dir,
            cipher,
            not_mandatory,
            no_check,
            kms,
        } => {
            let (backing, mut cfg) = load_config(&backing)?;
            let dir = normalize_dir(&dir)?;
            let kms = kms.to_config(&backing)?;
            if !no_check {
                let rt = KmsRuntime::new()?;
                let provider = kms.build(&rt)?;
                rt.block_on(provider.check())
                    .with_context(|| format!("the KMS for {dir} failed a wrap/unwrap round trip (use --no-check to save anyway)"))?;
            }
            cfg.set_policy(Policy {
                dir: dir.clone(),
                cipher,
                mandatory: !not_mandatory,
                kms,
            });
            cfg.save(&backing)?;
            eprintln!(
                "kmsfs: policy for {dir} saved; new files there use it after the next mount. Existing files keep their keys (see `kmsfs policy status`)."
            );
            Ok(())
        }
        PolicyCmd::List { backing } => print_json(&load_config(&backing)?.1.policies),
        PolicyCmd::Show { backing, dir } => {
            let cfg = load_config(&backing)?.1;
            print_json(cfg.policy_for(&normalize_dir(&dir)?))
        }
        PolicyCmd::Unset { backing, dir } => {
            let (backing, mut cfg) = load_config(&backing)?;
            let dir = normalize_dir(&dir)?;
            if dir == "/" {
                bail!("the root policy cannot be removed; replace it with `kmsfs policy set {} / ...`", backing.display());
            }
            if !cfg.unset_policy(&dir) {
                bail!(
                    "there is no policy for {dir} (see `kmsfs policy list {}`)",
                    backing.display()
                );
            }
            cfg.save(&backing)?;
            eprintln!("kmsfs: policy for {dir} removed; its files keep their keys, which stay usable for reading.");
            Ok(())
        }
        PolicyCmd::Status { backing } => inspect::policy_status(&backing),
    }
}
