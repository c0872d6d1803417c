//! `kmsfs keys status`: per policy, its current key version and that
//! version's age, and how many files are on each key and version, from the
//! headers alone (no file data is read, no DEK unwrapped). Files whose key
//! version the KMS no longer unwraps with (destroyed, disabled, below a
//! minimum version) are counted as unreadable: that is what crypto-shredding
//! a key leaves.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::rewrap::current_versions;
use super::{file_path, LifecycleError, Scope};
use crate::fs::sidecar::{self, SidecarError};
use crate::kms::{KeyProvider, KeyVersions, KmsError};

/// One policy's line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyKeyStatus {
    pub dir: String,
    /// The key new files are wrapped under, as `provider/key`.
    pub key: String,
    pub recipients: Vec<String>,
    /// How new files' DEKs are wrapped: per file, or under intermediate
    /// keys (`by_version` counts those by their KMS key version).
    pub key_mode: crate::policy::KeyMode,
    /// Its current version (`None`: the KMS does not name versions).
    pub current_version: Option<String>,
    /// When that version was made, seconds since the Unix epoch.
    pub current_created: Option<i64>,
    /// Its age in seconds.
    pub current_age_secs: Option<u64>,
    pub rotate_after: Option<String>,
    pub max_key_age: Option<String>,
    /// The current version is older than `rotate_after`.
    pub rotation_due: bool,
    /// The current version is older than `max_key_age`.
    pub past_max_age: bool,
    pub files: u64,
    /// Wrapped exactly as a new file would be (current key and version,
    /// and every recipient).
    pub files_current: u64,
    /// On an older version or another key, or missing a recipient:
    /// `kmsfs rewrap` brings them to the current one.
    pub files_stale: u64,
    pub files_plaintext: u64,
    /// No key of theirs that the policy allows can unwrap any more
    /// (destroyed or disabled version, unknown key): unreadable.
    pub files_unreadable: u64,
    /// Headers that could not be read or parsed.
    pub files_bad_header: u64,
    /// Files per primary key reference, `provider/key@version`.
    pub by_version: BTreeMap<String, u64>,
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The status of each policy of `scope`'s volume (only files within
/// `scope.dir` are counted).
pub fn status(scope: &Scope) -> Result<Vec<PolicyKeyStatus>, LifecycleError> {
    let versions = current_versions(scope)?;
    let keys = scope.file_keys();
    // What each key's KMS says of its versions, asked once per key.
    let mut known: HashMap<*const (), Option<KeyVersions>> = HashMap::new();
    let mut versions_of = |key: &Arc<dyn KeyProvider>| -> Option<KeyVersions> {
        let id = Arc::as_ptr(key) as *const ();
        known
            .entry(id)
            .or_insert_with(|| match scope.rt.block_on(key.key_versions()) {
                Ok(v) => Some(v),
                Err(KmsError::Unsupported { .. }) => None,
                Err(e) => {
                    tracing::warn!("{}: {e}", key.describe());
                    None
                }
            })
            .clone()
    };
    let now = now_secs();
    let mut rows: Vec<PolicyKeyStatus> = Vec::new();
    for (i, p) in scope.volume.policies.iter().enumerate() {
        let state = versions_of(&p.current);
        let created = state.as_ref().and_then(|s| s.current_created);
        let age = created.map(|c| (now - c).max(0) as u64);
        let older = |limit: Option<std::time::Duration>| match (age, limit) {
            (Some(a), Some(l)) => a >= l.as_secs(),
            _ => false,
        };
        rows.push(PolicyKeyStatus {
            dir: p.policy.dir.clone(),
            key: format!("{}/{}", p.policy.key.provider, p.policy.key.id),
            recipients: p.policy.recipients.iter().map(|k| k.to_string()).collect(),
            key_mode: p.policy.key_mode,
            current_version: versions[i][0].clone(),
            current_created: created,
            current_age_secs: age,
            rotate_after: p.policy.rotate_after.map(crate::duration::format),
            max_key_age: p.policy.max_key_age.map(crate::duration::format),
            rotation_due: older(p.policy.rotate_after),
            past_max_age: older(p.policy.max_key_age),
            files: 0,
            files_current: 0,
            files_stale: 0,
            files_plaintext: 0,
            files_unreadable: 0,
            files_bad_header: 0,
            by_version: BTreeMap::new(),
        });
    }
    scope.walk(|dir, rel, listing| {
        for name in &listing.files {
            let path = file_path(rel, name);
            let i = scope.policy_index(&path);
            let active = &scope.volume.policies[i];
            let row = &mut rows[i];
            row.files += 1;
            let header = match sidecar::read_at(dir.as_raw_fd(), name) {
                Ok(h) => h,
                Err(SidecarError::Missing) => {
                    row.files_plaintext += 1;
                    continue;
                }
                Err(_) => {
                    row.files_bad_header += 1;
                    continue;
                }
            };
            let h = &header.parsed.header;
            let p = h.primary();
            *row.by_version
                .entry(format!(
                    "{}/{}@{}",
                    p.key_ref.provider,
                    p.key_ref.key_id,
                    crate::format::ik::base_version(&p.key_ref.key_version)
                ))
                .or_default() += 1;
            let readable = h.wraps().iter().any(|w| {
                let Some(key) = active.key_for(&w.key_ref, h.version() == 1) else {
                    return false;
                };
                match versions_of(key) {
                    // Versions named: this one must be listed and usable.
                    Some(v) if v.current.is_some() => v.versions.iter().any(|kv| {
                        kv.version == crate::format::ik::base_version(&w.key_ref.key_version)
                            && kv.can_unwrap
                    }),
                    _ => true,
                }
            });
            let current = |k: usize| versions[i].get(k).cloned().flatten();
            if !readable {
                row.files_unreadable += 1;
            } else if keys.is_wrapped_as(h, active, &current) {
                row.files_current += 1;
            } else {
                row.files_stale += 1;
            }
        }
    })?;
    Ok(rows)
}
