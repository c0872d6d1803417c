//! `kmsfs keys`: keys where they live. `create`, `destroy`, and the
//! `--key-file` forms of `list` and `rotate` work on a local keyring file;
//! `list` and `rotate` with BACKING DIR work on the key of the policy
//! governing DIR, in whichever KMS holds it; `status` shows which key
//! versions a volume's files are on.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;

use kmsfs::audit::{AuditEvent, AuditOp, AuditOutcome};
use kmsfs::config::Calls;
use kmsfs::kms::local::Keyring;
use kmsfs::kms::KeyRef;
use kmsfs::policy::normalize_dir;

use super::{absolute, lifecycle, print_json, trust};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create a keyring (if missing) with a new key.
    Create {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// List a key's versions (never key bytes): of a keyring file
    /// (--key-file), or of the key of the policy governing DIR of BACKING,
    /// in whichever KMS holds it.
    List {
        #[arg(long, conflicts_with_all = ["backing", "dir"])]
        key_file: Option<PathBuf>,
        #[arg(required_unless_present = "key_file")]
        backing: Option<PathBuf>,
        #[arg(default_value = "/")]
        dir: String,
    },
    /// Add a new version of a key; new files use it at once (running mounts
    /// too), older versions still unwrap. `kmsfs rewrap` moves existing
    /// files to it.
    Rotate {
        /// A keyring file (with --name), rather than a policy's key.
        #[arg(long, conflicts_with_all = ["backing", "dir"])]
        key_file: Option<PathBuf>,
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(required_unless_present = "key_file")]
        backing: Option<PathBuf>,
        /// The policy governing DIR names the key to rotate.
        #[arg(default_value = "/")]
        dir: String,
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
    },
    /// Per policy: the current key version and its age, and how many files
    /// are on each key version (stale, unreadable), from headers alone.
    Status {
        backing: PathBuf,
        #[arg(default_value = "/")]
        dir: String,
        #[arg(long)]
        json: bool,
    },
    /// Crypto-shred: destroy a version of a local key (or, without
    /// --version, the whole key). Every file wrapped only under it becomes
    /// unreadable for good. For remote KMSs use the KMS's own steps (see
    /// docs/KEY_LIFECYCLE.md).
    Destroy {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: Option<u32>,
        /// Required: there is no undo.
        #[arg(long)]
        yes: bool,
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
    },
}

pub fn keys(action: KeysCmd) -> Result<()> {
    match action {
        KeysCmd::Create { key_file, name } => {
            let key_file = absolute(&key_file)?;
            let mut keyring = if key_file.exists() {
                Keyring::load(&key_file)?
            } else {
                Keyring::create_empty(&key_file)?
            };
            keyring.create_key(&name)?;
            eprintln!(
                "kmsfs: created key {name:?} (version 1) in {}",
                key_file.display()
            );
        }
        KeysCmd::List {
            key_file: Some(key_file),
            ..
        } => {
            let keyring = Keyring::load(&key_file)?;
            print_json(&keyring.list())?;
        }
        KeysCmd::List {
            backing: Some(backing),
            dir,
            ..
        } => {
            let (volume, rt) = trust::open_volume(&backing, &Calls::Once)?;
            let active = volume.policy_for(&normalize_dir(&dir)?);
            let versions = rt.block_on(active.current.key_versions())?;
            print_json(&serde_json::json!({
                "policy": active.policy.dir,
                "key": active.policy.key.to_string(),
                "kms": active.current.describe(),
                "current": versions.current,
                "current_created": versions.current_created,
                "versions": versions.versions,
            }))?;
        }
        KeysCmd::List { .. } => unreachable!("clap requires BACKING or --key-file"),
        KeysCmd::Rotate {
            key_file: Some(key_file),
            name,
            audit_log,
            ..
        } => {
            let audit = trust::audit_log(audit_log.as_deref())?;
            let mut keyring = Keyring::load(&key_file)?;
            let version = keyring.rotate(&name)?;
            let key_ref = KeyRef {
                provider: "local".into(),
                key_id: name.clone(),
                key_version: version.to_string(),
            };
            let detail = format!("keyring {}", key_file.display());
            audit.record(
                &AuditEvent::new(AuditOp::Rotate, AuditOutcome::Ok)
                    .key(&key_ref)
                    .detail(&detail),
            );
            eprintln!(
                "kmsfs: key {name:?} is now at version {version}; new files use it (running mounts too), older versions still unwrap; `kmsfs rewrap BACKING` moves existing files to it"
            );
        }
        KeysCmd::Rotate {
            backing: Some(backing),
            dir,
            audit_log,
            ..
        } => {
            return lifecycle::rotate_cmd(lifecycle::RotateArgs::now(backing, dir, audit_log, true))
        }
        KeysCmd::Rotate { .. } => unreachable!("clap requires BACKING or --key-file"),
        KeysCmd::Status { backing, dir, json } => {
            return lifecycle::status_cmd(&backing, &dir, json)
        }
        KeysCmd::Destroy {
            key_file,
            name,
            version,
            yes,
            audit_log,
        } => {
            if !yes {
                bail!(
                    "destroying {} of key {name:?} makes every file wrapped only under it unreadable for good; add --yes to do it (check `kmsfs keys status BACKING` first)",
                    version.map_or("every version".to_string(), |v| format!("version {v}"))
                );
            }
            let audit = trust::audit_log(audit_log.as_deref())?;
            let mut keyring = Keyring::load(&key_file)?;
            let gone = keyring.destroy(&name, version)?;
            for v in &gone {
                let key_ref = KeyRef {
                    provider: "local".into(),
                    key_id: name.clone(),
                    key_version: v.to_string(),
                };
                let detail = format!("keyring {}", key_file.display());
                audit.record(
                    &AuditEvent::new(AuditOp::Destroy, AuditOutcome::Ok)
                        .key(&key_ref)
                        .detail(&detail),
                );
            }
            eprintln!(
                "kmsfs: destroyed version(s) {gone:?} of key {name:?} in {}; files wrapped only under them cannot be read any more. Running mounts forget DEKs they cached within the cache TTL (or remount them now)",
                key_file.display()
            );
        }
    }
    Ok(())
}
