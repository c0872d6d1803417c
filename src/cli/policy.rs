//! `kmsfs policy`: which key protects new files under which directory.
//! `policy status` looks at the files themselves, so it is in `inspect`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use kmsfs::config::{Calls, VolumeConfig};
use kmsfs::format::CipherSuite;
use kmsfs::policy::{normalize_dir, Policy};

use super::kms_args::{self, KmsArgs};
use super::{absolute, inspect, print_json, trust};

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
        /// Do not check the key's KMS after saving (a key-metadata read or a
        /// wrap/unwrap round trip). Connecting to it is still needed: the
        /// change is authenticated with the root key.
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
            let backing = absolute(&backing)?;
            let dir = normalize_dir(&dir)?;
            let _lock = VolumeConfig::lock(&backing)?;
            let key = kms.to_key(&backing)?;
            let (mut volume, rt) = trust::open_volume(&backing, &Calls::Once)?;
            let policy = Policy {
                dir: dir.clone(),
                cipher,
                mandatory: !not_mandatory,
                key,
                retired: vec![],
            };
            volume.set_policy(policy, &trust::load()?, &rt, !no_check)?;
            if !no_check {
                let active = volume.policy_for(&dir);
                rt.block_on(active.current.check()).with_context(|| {
                    format!(
                        "the policy for {dir} is saved, but its KMS failed a check: {}",
                        active.current.describe()
                    )
                })?;
            }
            eprintln!(
                "kmsfs: policy for {dir} saved; new files there use it after the next mount. Existing files keep their keys (see `kmsfs policy status`)."
            );
            Ok(())
        }
        PolicyCmd::List { backing } => print_json(
            &trust::open_volume(&backing, &Calls::Once)?
                .0
                .config
                .policies,
        ),
        PolicyCmd::Show { backing, dir } => {
            let volume = trust::open_volume(&backing, &Calls::Once)?.0;
            print_json(volume.config.policy_for(&normalize_dir(&dir)?))
        }
        PolicyCmd::Unset { backing, dir } => {
            let backing = absolute(&backing)?;
            let dir = normalize_dir(&dir)?;
            if dir == "/" {
                bail!("the root policy cannot be removed; replace it with `kmsfs policy set {} / ...`", backing.display());
            }
            let _lock = VolumeConfig::lock(&backing)?;
            let (mut volume, _rt) = trust::open_volume(&backing, &Calls::Once)?;
            if !volume.unset_policy(&dir)? {
                bail!(
                    "there is no policy for {dir} (see `kmsfs policy list {}`)",
                    backing.display()
                );
            }
            eprintln!("kmsfs: policy for {dir} removed; its files keep their keys, which stay usable for reading.");
            Ok(())
        }
        PolicyCmd::Status { backing } => inspect::policy_status(&backing),
    }
}
