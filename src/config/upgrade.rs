//! Upgrading a format 1 volume (`kmsfs upgrade BACKING`): its KMS settings
//! move into the trusted configuration as named providers, and its
//! configuration becomes format 2, authenticated.
//!
//! Format 1 let any configured key open any file anywhere. Format 2 ties
//! files to their directory's policy (its key, or a retired key recorded
//! for it), so the upgrade reads every file's header once and records, per
//! policy, the keys its files are actually under: nothing that opened
//! before stops opening. Files keep their format 1 headers and blocks
//! (`legacy_v1_files`); new files are format 2.
//!
//! The format 1 configuration is untrusted input like the rest of the
//! backing directory: whoever can write it can name their own KMS, or a
//! credential file for kmsfs to send there. So the upgrade is planned
//! first ([`plan`]), with nothing written or connected, and the operator
//! confirms the providers it would add before [`upgrade`] adds them. A
//! volume that was format 2 once (a kept format 1 backup, or any format 2
//! header) is never "upgraded" again: its format 1 configuration was
//! planted.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::legacy::LegacyConfig;
use super::open::Volume;
use super::trusted::{self, TrustedConfig};
use super::volume::VolumeConfig;
use super::ConfigError;
use crate::format::header::VERSION_1;
use crate::format::names::CONFIG_FILE;
use crate::fs::{escape_name, sidecar, sys, walk};
use crate::kms::config::{KeySpec, ProviderDef};
use crate::kms::named::NamedKey;
use crate::kms::{KeyProvider, KmsRuntime};
use crate::policy::Policy;

/// Where the format 1 configuration is kept after an upgrade (a reserved
/// name, invisible in the mount).
pub const FORMAT_ONE_BACKUP: &str = ".kmsfs-config.v1.toml";

/// What an upgrade did.
#[derive(Debug, serde::Serialize)]
pub struct UpgradeReport {
    /// (provider name, its definition as TOML, whether it was added).
    pub providers: Vec<(String, String, bool)>,
    pub policies: Vec<Policy>,
    pub files: u64,
    /// Files whose header no configured key handles (they did not open
    /// before either).
    pub files_under_unknown_keys: u64,
    pub files_without_header: u64,
}

/// What an upgrade would do, before anything is written or connected.
pub struct UpgradePlan {
    legacy: LegacyConfig,
    /// Each format 1 KMS setting as a provider definition (to be named when
    /// added) and its key.
    pub providers: Vec<(ProviderDef, KeySpec)>,
}

/// Plans the upgrade of `backing`: reads its format 1 configuration and
/// checks that the volume was never format 2.
pub fn plan(backing: &Path) -> Result<UpgradePlan, ConfigError> {
    let legacy = LegacyConfig::load(backing)?;
    let planted = |detail: String| ConfigError::Invalid {
        path: VolumeConfig::path(backing),
        detail,
    };
    if backing.join(FORMAT_ONE_BACKUP).symlink_metadata().is_ok() {
        return Err(planted(format!(
            "this volume was upgraded before ({FORMAT_ONE_BACKUP} is there), so this format 1 \
             configuration replaced its format 2 one; restore the format 2 configuration from \
             a backup instead of upgrading, and check who can write the backing directory"
        )));
    }
    let mut format_2 = None;
    walk::walk(backing, |dir, rel, names| {
        for name in names {
            match sidecar::read_at(dir.as_raw_fd(), name) {
                Ok(h) if h.parsed.header.version() != VERSION_1 && format_2.is_none() => {
                    format_2 = Some(format!(
                        "{}/{}",
                        rel.trim_end_matches('/').escape_debug(),
                        escape_name(name.as_bytes())
                    ));
                }
                _ => {}
            }
        }
    })
    .map_err(|e| ConfigError::Io {
        path: backing.to_owned(),
        source: e.source,
    })?;
    if let Some(file) = format_2 {
        return Err(planted(format!(
            "{file} has a format 2 header, which only a format 2 volume writes, so this format 1 \
             configuration replaced the volume's format 2 one; restore that from a backup \
             instead of upgrading, and check who can write the backing directory"
        )));
    }
    let providers = legacy.all_kms().into_iter().map(|k| k.split("")).collect();
    Ok(UpgradePlan { legacy, providers })
}

/// Carries out `plan` on `backing`: its providers are connected, then
/// added to the trusted configuration at `trusted_path` (or found there),
/// the files' headers read, and the configuration rewritten as format 2.
/// Under the volume configuration's lock, and only if the volume is still
/// what `plan` showed: nothing else may have upgraded or changed it since
/// the operator confirmed.
pub fn upgrade(
    plan: UpgradePlan, backing: &Path, trusted_path: &Path, rt: &KmsRuntime,
) -> Result<UpgradeReport, ConfigError> {
    let _lock = VolumeConfig::lock(backing)?;
    let UpgradePlan { legacy, providers } = plan;
    if self::plan(backing)?.providers != providers {
        return Err(ConfigError::Invalid {
            path: VolumeConfig::path(backing),
            detail: "changed while the upgrade waited for confirmation; run `kmsfs upgrade` again"
                .into(),
        });
    }
    // Connected before anything is written: a provider that cannot be
    // used leaves the trusted configuration as it was.
    let inner: Vec<Arc<dyn KeyProvider>> = providers
        .iter()
        .map(|(def, spec)| {
            let cfg = def.resolve(spec).map_err(|detail| ConfigError::Invalid {
                path: VolumeConfig::path(backing),
                detail,
            })?;
            Ok(cfg.build(rt)?)
        })
        .collect::<Result<_, ConfigError>>()?;
    // Each format 1 key becomes a named provider and a key in it.
    let mut keys: Vec<(KeySpec, String, bool)> = Vec::new();
    trusted::update(trusted_path, |t| {
        for (def, spec) in providers {
            let shown = toml::to_string(&def.settings).unwrap_or_default();
            let (name, added) = t.find_or_add(def, None)?;
            keys.push((
                KeySpec {
                    provider: name,
                    ..spec
                },
                shown,
                added,
            ));
        }
        Ok(())
    })?;
    let trusted = TrustedConfig::load(trusted_path)?;
    let connected: Vec<Arc<dyn KeyProvider>> = keys
        .iter()
        .zip(inner)
        .map(|((spec, _, _), inner)| NamedKey::wrap(&spec.provider, inner))
        .collect();
    let spec_of = |kms| {
        let i = legacy
            .all_kms()
            .iter()
            .position(|k| *k == kms)
            .expect("listed");
        keys[i].0.clone()
    };
    // The keys each policy's files are under.
    let mut used: Vec<BTreeSet<KeySpec>> = vec![BTreeSet::new(); legacy.policies.len()];
    let (mut files, mut unknown, mut headerless) = (0u64, 0u64, 0u64);
    walk::walk(backing, |dir, rel, names| {
        let governing = legacy.governing(rel);
        for name in names {
            files += 1;
            let Ok(h) = sidecar::read_at(dir.as_raw_fd(), name) else {
                headerless += 1;
                continue;
            };
            let key_ref = &h.parsed.header.primary().key_ref;
            match connected.iter().position(|k| k.handles(key_ref)) {
                Some(i) => {
                    used[governing].insert(keys[i].0.clone());
                }
                None => unknown += 1,
            }
        }
    })
    .map_err(|e| ConfigError::Io {
        path: backing.to_owned(),
        source: e.source,
    })?;
    let policies: Vec<Policy> = legacy
        .policies
        .iter()
        .zip(&used)
        .map(|(p, used)| {
            let mut policy = Policy::new(p.dir.clone(), p.cipher, p.mandatory, spec_of(&p.kms));
            policy.retire(used);
            policy
        })
        .collect();
    // Keep the format 1 file, out of sight, until the new one is written.
    let path = VolumeConfig::path(backing);
    let backup = backing.join(FORMAT_ONE_BACKUP);
    // Never over an existing backup (RENAME_NOREPLACE): it would be lost.
    let moved = (|| {
        let (from, to) = (sys::cstr(path.as_os_str())?, sys::cstr(backup.as_os_str())?);
        sys::renameat2(
            libc::AT_FDCWD,
            &from,
            libc::AT_FDCWD,
            &to,
            libc::RENAME_NOREPLACE,
        )
    })();
    moved.map_err(|source| ConfigError::Io {
        path: path.clone(),
        source,
    })?;
    if let Err(e) = Volume::create(
        backing,
        &trusted,
        rt,
        legacy.block_size,
        policies.clone(),
        true,
    ) {
        let _ = std::fs::rename(&backup, &path);
        return Err(e);
    }
    debug_assert_eq!(path.file_name().unwrap(), CONFIG_FILE);
    Ok(UpgradeReport {
        providers: keys
            .into_iter()
            .map(|(spec, shown, added)| (spec.provider, shown, added))
            .collect(),
        policies,
        files,
        files_under_unknown_keys: unknown,
        files_without_header: headerless,
    })
}
