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
//! backing directory: the upgrade is an explicit command, and it reports
//! every provider it adds so the operator can check them.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use super::legacy::LegacyConfig;
use super::open::Volume;
use super::trusted::{self, TrustedConfig};
use super::volume::VolumeConfig;
use super::ConfigError;
use crate::format::names::CONFIG_FILE;
use crate::fs::{sidecar, walk};
use crate::kms::config::KeySpec;
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

/// Upgrades the format 1 volume `backing`, adding its providers to the
/// trusted configuration at `trusted_path`.
pub fn upgrade(
    backing: &Path, trusted_path: &Path, rt: &KmsRuntime,
) -> Result<UpgradeReport, ConfigError> {
    let legacy = LegacyConfig::load(backing)?;
    // Each format 1 key becomes a named provider and a key in it.
    let mut keys: Vec<(KeySpec, String, bool)> = Vec::new();
    trusted::update(trusted_path, |t| {
        for kms in legacy.all_kms() {
            let (def, spec) = kms.split("");
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
        .map(|(spec, _, _)| {
            let cfg = trusted.resolve(spec)?;
            Ok(NamedKey::wrap(&spec.provider, cfg.build(rt)?))
        })
        .collect::<Result<_, ConfigError>>()?;
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
            let mut policy = Policy {
                dir: p.dir.clone(),
                cipher: p.cipher,
                mandatory: p.mandatory,
                key: spec_of(&p.kms),
                retired: Vec::new(),
            };
            policy.retire(used);
            policy
        })
        .collect();
    // Keep the format 1 file, out of sight, until the new one is written.
    let path = VolumeConfig::path(backing);
    let backup = backing.join(FORMAT_ONE_BACKUP);
    std::fs::rename(&path, &backup).map_err(|source| ConfigError::Io {
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
