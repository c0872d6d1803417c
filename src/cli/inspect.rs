//! Inspection of files at rest: `kmsfs info` (one file's header) and
//! `kmsfs policy status` (which key each file is wrapped under). Both read
//! headers through `kmsfs::fs::sidecar`, and `info --verify` gets the
//! file's cipher through `FileKeys`, as the mount does.

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use kmsfs::cache::DekCache;
use kmsfs::config::{Calls, VolumeConfig};
use kmsfs::format::names::is_reserved;
use kmsfs::fs::file_keys::FileKeys;
use kmsfs::fs::{sidecar, walk};
use kmsfs::policy::normalize_dir;

use super::{mountinfo, print_json, trust};

/// `kmsfs info`: a file's header facts as JSON; with `verify`, also unwraps
/// its DEK (with a key its directory's policy allows) and authenticates the
/// header, as the mount would when opening it.
pub fn info(path: &Path, verify: bool) -> Result<()> {
    let (file, root) = backing_path(path)?;
    let name = file.file_name().expect("has a name");
    if is_reserved(name.as_bytes()) {
        bail!("{} is kmsfs metadata, not a file", path.display());
    }
    let header = sidecar::read_beside(&file).map_err(|e| {
        anyhow!(
            "{}: no readable kmsfs header ({e}); is it a regular file in a kmsfs mount or backing directory?",
            path.display(),
        )
    })?;
    let h = &header.parsed.header;
    // Not following a symlink, and never opening anything but a regular file:
    // the backing directory is untrusted (a FIFO would block an open).
    let ct_size = match std::fs::symlink_metadata(&file) {
        Ok(m) if m.file_type().is_file() => Some(m.len()),
        Ok(_) => bail!(
            "{}: its backing {} is not a regular file",
            path.display(),
            file.display()
        ),
        Err(_) => None,
    };
    let keys: Vec<serde_json::Value> = h
        .wraps()
        .iter()
        .map(|w| {
            serde_json::json!({
                "provider": w.key_ref.provider,
                "key_id": w.key_ref.key_id,
                "key_version": w.key_ref.key_version,
                "wrapped_dek_bytes": w.blob.len(),
            })
        })
        .collect();
    let primary = &keys[0];
    let mut out = serde_json::json!({
        "path": path.display().to_string(),
        "backing_path": file.display().to_string(),
        "format_version": h.version(),
        "cipher": h.cipher.name(),
        "block_size": h.geometry.block_size(),
        "file_id": hex::encode(h.file_id),
        "key": {
            "provider": primary["provider"],
            "key_id": primary["key_id"],
            "key_version": primary["key_version"],
        },
        "wrapped_dek_bytes": primary["wrapped_dek_bytes"],
        "keys": keys,
        "plaintext_size": ct_size.map(|c| h.geometry.plaintext_size(c)),
        "ciphertext_size": ct_size,
    });
    if verify {
        let root =
            root.ok_or_else(|| anyhow!("cannot find the backing directory of {}", path.display()))?;
        let rel = file.strip_prefix(&root).expect("under its root");
        let dir = format!("/{}", rel.parent().unwrap_or(Path::new("")).display());
        let (volume, rt) = trust::open_volume(&root, &Calls::Once)?;
        let keys = FileKeys::new(
            DekCache::new(1, Duration::from_secs(1)),
            volume.id(),
            volume.config.legacy_v1_files,
        );
        let policy = volume.policy_for(&normalize_dir(&dir)?);
        rt.block_on(keys.cipher_for(&header, policy, &rel.display().to_string(), None))
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        out["header_verified"] = serde_json::Value::Bool(true);
    }
    print_json(&out)
}

/// Maps a path inside a kmsfs mount to the backing path; other paths are
/// taken as backing paths already. Returns (backing file, backing root).
fn backing_path(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} names no file", path.display()))?;
    let dir = std::fs::canonicalize(parent)
        .with_context(|| format!("cannot resolve {}", parent.display()))?;
    let full = dir.join(name);
    let innermost = mountinfo::mounts()
        .into_iter()
        .filter(|m| m.kmsfs_backing().is_some() && full.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len());
    if let Some(m) = innermost {
        let root = m.kmsfs_backing().expect("filtered").to_path_buf();
        let rel = full.strip_prefix(&m.mountpoint).expect("prefix checked");
        return Ok((root.join(rel), Some(root)));
    }
    // A backing path: find the backing root by its config file.
    let root = full
        .ancestors()
        .skip(1)
        .find(|a| VolumeConfig::path(a).exists())
        .map(Path::to_path_buf);
    Ok((full, root))
}

/// One line of `kmsfs policy status`.
#[derive(serde::Serialize, Default)]
struct PolicyStatusRow {
    dir: String,
    kms: String,
    mandatory: bool,
    files_on_current_key: u64,
    files_on_other_keys: u64,
    files_without_sidecar: u64,
}

/// `kmsfs policy status`: counts, per policy, the files under its current
/// key, under other keys, and without a sidecar.
pub fn policy_status(backing: &Path) -> Result<()> {
    let (volume, _rt) = trust::open_volume(backing, &Calls::Once)?;
    let mut rows: Vec<PolicyStatusRow> = volume
        .policies
        .iter()
        .map(|p| PolicyStatusRow {
            dir: p.policy.dir.clone(),
            kms: p.current.describe(),
            mandatory: p.policy.mandatory,
            ..Default::default()
        })
        .collect();
    walk::walk(&volume.backing, |dir, rel, files| {
        let governing = kmsfs::policy::governing(&volume.config.policies, rel);
        let current = &volume.policies[governing].current;
        let row = &mut rows[governing];
        for name in files {
            match sidecar::read_at(dir.as_raw_fd(), name) {
                Err(_) => row.files_without_sidecar += 1,
                Ok(h) if current.is_current_key(&h.parsed.header.primary().key_ref) => {
                    row.files_on_current_key += 1
                }
                Ok(_) => row.files_on_other_keys += 1,
            }
        }
    })?;
    print_json(&rows)
}
