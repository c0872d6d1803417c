//! `kmsfs policy`: which key protects new files under which directory.
//! `policy status` looks at the files themselves, so it is in `inspect`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use kmsfs::audit::{AuditEvent, AuditOp, AuditOutcome};
use kmsfs::config::{Calls, VolumeConfig};
use kmsfs::format::CipherSuite;
use kmsfs::kms::config::KeySpec;
use kmsfs::policy::{normalize_dir, KeyMode, Policy};

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
        /// Also wrap each new file's DEK under this key (break-glass), as
        /// PROVIDER:KEY with PROVIDER a provider of the trusted
        /// configuration; repeatable. `kmsfs rewrap` adds it to existing
        /// files.
        #[arg(long = "recipient", value_name = "PROVIDER:KEY", value_parser = parse_recipient)]
        recipients: Vec<KeySpec>,
        /// Rotate the key once its current version is this old, when
        /// `kmsfs rotate --due` runs (e.g. 90d).
        #[arg(long, value_parser = kmsfs::duration::parse)]
        rotate_after: Option<Duration>,
        /// Make `kmsfs rotate --due` fail while the key's current version is
        /// older than this (e.g. 365d).
        #[arg(long, value_parser = kmsfs::duration::parse)]
        max_key_age: Option<Duration>,
        /// per-file: the KMS wraps each new file's DEK. directory: the KMS
        /// wraps an intermediate key now and then, and new files' DEKs are
        /// wrapped under it (no KMS call per create).
        #[arg(long, default_value = "per-file")]
        key_mode: KeyMode,
        /// Directory mode: a new intermediate key once the current one is
        /// this old (default 24h).
        #[arg(long, value_parser = kmsfs::duration::parse)]
        intermediate_rotate_after: Option<Duration>,
        /// Directory mode: a new intermediate key once the current one
        /// wrapped this many DEKs (default 1000000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=kmsfs::kms::intermediate::MAX_FILES_CAP))]
        intermediate_max_files: Option<u64>,
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
            recipients,
            rotate_after,
            max_key_age,
            key_mode,
            intermediate_rotate_after,
            intermediate_max_files,
            kms,
        } => {
            if key_mode != KeyMode::Directory
                && (intermediate_rotate_after.is_some() || intermediate_max_files.is_some())
            {
                bail!("--intermediate-rotate-after and --intermediate-max-files apply to --key-mode directory only");
            }
            let backing = absolute(&backing)?;
            let dir = normalize_dir(&dir)?;
            let most = kmsfs::format::header::MAX_WRAPS - 1;
            if recipients.len() > most {
                bail!(
                    "a policy takes at most {most} recipients (a header holds {} wrapped DEKs)",
                    most + 1
                );
            }
            let _lock = VolumeConfig::lock(&backing)?;
            let key = kms.to_key(&backing)?;
            let (mut volume, rt) = trust::open_volume(&backing, &Calls::Once)?;
            let mut policy = Policy::new(dir.clone(), cipher, !not_mandatory, key);
            policy.recipients = recipients;
            policy.rotate_after = rotate_after;
            policy.max_key_age = max_key_age;
            policy.key_mode = key_mode;
            policy.intermediate_rotate_after = intermediate_rotate_after;
            policy.intermediate_max_files = intermediate_max_files;
            let audit = trust::audit_log(None)?;
            let detail = format!("policy {dir}: key {}", policy.key);
            volume.set_policy(policy, &trust::load()?, &rt, !no_check)?;
            audit.record(
                &AuditEvent::new(AuditOp::PolicySet, AuditOutcome::Ok)
                    .path(&dir)
                    .detail(&detail),
            );
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
                "kmsfs: policy for {dir} saved; running mounts use it for new files at once. Existing files keep their keys until `kmsfs rewrap {} {dir}` (see `kmsfs keys status`).",
                backing.display()
            );
            Ok(())
        }
        PolicyCmd::List { backing } => print_json(
            &trust::open_volume(&backing, &Calls::Once)?
                .0
                .config
                .policies
                .iter()
                .map(shown)
                .collect::<Vec<_>>(),
        ),
        PolicyCmd::Show { backing, dir } => {
            let volume = trust::open_volume(&backing, &Calls::Once)?.0;
            print_json(&shown(volume.config.policy_for(&normalize_dir(&dir)?)))
        }
        PolicyCmd::Unset { backing, dir } => {
            let backing = absolute(&backing)?;
            let dir = normalize_dir(&dir)?;
            if dir == "/" {
                bail!("the root policy cannot be removed; replace it with `kmsfs policy set {} / ...`", backing.display());
            }
            let _lock = VolumeConfig::lock(&backing)?;
            let (mut volume, _rt) = trust::open_volume(&backing, &Calls::Once)?;
            let audit = trust::audit_log(None)?;
            if !volume.unset_policy(&dir)? {
                bail!(
                    "there is no policy for {dir} (see `kmsfs policy list {}`)",
                    backing.display()
                );
            }
            audit.record(&AuditEvent::new(AuditOp::PolicyUnset, AuditOutcome::Ok).path(&dir));
            eprintln!("kmsfs: policy for {dir} removed; its files keep their keys, which stay usable for reading.");
            Ok(())
        }
        PolicyCmd::Status { backing } => inspect::policy_status(&backing),
    }
}

/// A policy as `policy list` and `show` print it: as configured, with its
/// key mode always named (the configuration leaves out the default).
fn shown(p: &Policy) -> serde_json::Value {
    let mut v = serde_json::to_value(p).expect("a policy serializes");
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "key_mode".into(),
            serde_json::to_value(p.key_mode).expect("serializes"),
        );
    }
    v
}

/// `PROVIDER:KEY` as a key of a trusted provider (the key ID may itself
/// hold ':', as AWS ARNs do; provider names never do).
fn parse_recipient(s: &str) -> Result<KeySpec, String> {
    match s.split_once(':') {
        Some((provider, id)) if !provider.is_empty() && !id.is_empty() => Ok(KeySpec {
            provider: provider.into(),
            id: id.into(),
            version: None,
        }),
        _ => Err(format!(
            "{s:?} is not PROVIDER:KEY (a provider of the trusted configuration, then the key's ID)"
        )),
    }
}
