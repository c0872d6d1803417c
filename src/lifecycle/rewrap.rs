//! `kmsfs rewrap`: every file's DEK wrapped again under its policy's
//! current keys, in KMS batches; data files untouched (same bytes, same
//! mtime); each header replaced in one atomic exchange.

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::{
    file_path, key_files, lock, run_batches, sync_dir, Entry, Item, LifecycleError, Progress,
    Scope, Summary, Tally, BATCH,
};
use crate::audit::{AuditEvent, AuditOp, AuditOutcome};
use crate::fs::sidecar::{self, FileHeader, Replaced, SidecarError};
use crate::kms::KmsError;

/// How `rewrap` runs.
#[derive(Clone, Debug)]
pub struct RewrapOptions {
    /// Count what would change; change nothing.
    pub dry_run: bool,
    /// Batches in flight at once.
    pub concurrency: usize,
    /// Rewrap every file, also those already under the current key and
    /// version (for a KMS that never names versions, as AWS KMS after a
    /// rotation).
    pub all: bool,
}

impl Default for RewrapOptions {
    fn default() -> Self {
        RewrapOptions {
            dry_run: false,
            concurrency: 2,
            all: false,
        }
    }
}

/// A file to rewrap.
/// The current version of each wrapping key of each policy (`None`: the
/// KMS does not name versions, so any version is current).
pub(super) fn current_versions(scope: &Scope) -> Result<Vec<Vec<Option<String>>>, LifecycleError> {
    scope
        .volume
        .policies
        .iter()
        .map(|p| {
            p.wrapping()
                .iter()
                .map(|key| match scope.rt.block_on(key.key_versions()) {
                    Ok(v) => Ok(v.current),
                    Err(KmsError::Unsupported { .. }) => Ok(None),
                    Err(source) => Err(LifecycleError::KeyVersions {
                        key: key.describe(),
                        source,
                    }),
                })
                .collect()
        })
        .collect()
}

/// A key reference as the audit detail shows it.
fn refs(h: &FileHeader) -> String {
    let parts: Vec<String> = h
        .parsed
        .header
        .wraps()
        .iter()
        .map(|w| {
            format!(
                "{}/{}@{}",
                w.key_ref.provider, w.key_ref.key_id, w.key_ref.key_version
            )
        })
        .collect();
    parts.join("+")
}

/// Rewraps the files of `scope` (see the module documentation).
pub fn rewrap(
    scope: &Scope, opts: &RewrapOptions, progress: &dyn Progress,
) -> Result<Summary, LifecycleError> {
    let _lock = lock(&scope.volume.backing)?;
    let versions = current_versions(scope)?;
    let keys = scope.file_keys();
    let tally = Tally::new(Summary::new("rewrap", &scope.dir, opts.dry_run));
    progress.start(scope.count_files()?);

    let work = |batch: Vec<Item>| {
        let files = key_files(scope, &batch);
        let results = scope.rt.block_on(keys.rewrap(&files));
        let mut dirs: Vec<super::SharedDir> = Vec::new();
        for (it, result) in batch.iter().zip(results) {
            let retry = result.as_ref().err().is_some_and(|e| e.is_retryable());
            let outcome = result.map_err(|e| e.to_string()).and_then(|new| {
                sidecar::replace_at(
                    it.entry.dir.as_raw_fd(),
                    &it.entry.name,
                    &it.header.raw,
                    &new.raw,
                )
                .map(|r| (r, new))
                .map_err(|e| e.to_string())
            });
            match outcome {
                Ok((Replaced::Done, new)) => {
                    let detail = format!("from {} to {}", refs(&it.header), refs(&new));
                    scope.audit.record(
                        &AuditEvent::new(AuditOp::Rewrap, AuditOutcome::Ok)
                            .key(&new.parsed.header.primary().key_ref)
                            .file(new.parsed.header.file_id)
                            .path(&it.entry.path)
                            .detail(&detail),
                    );
                    if !dirs.iter().any(|d| Arc::ptr_eq(d, &it.entry.dir)) {
                        dirs.push(it.entry.dir.clone());
                    }
                    tally.with(|s| s.changed += 1);
                }
                Ok((Replaced::Changed, _)) => tally.with(|s| s.changed_meanwhile += 1),
                // Removed meanwhile: nothing left to rewrap.
                Ok((Replaced::Gone, _)) => tally.with(|s| s.up_to_date += 1),
                Err(e) => {
                    scope.audit.record(
                        &AuditEvent::new(AuditOp::Rewrap, AuditOutcome::Failed(&e))
                            .key(&it.header.parsed.header.primary().key_ref)
                            .file(it.header.parsed.header.file_id)
                            .path(&it.entry.path),
                    );
                    tally.with(|s| {
                        s.retryable += u64::from(retry);
                        s.fail(progress, &it.entry.path, e)
                    });
                }
            }
        }
        for d in dirs {
            if let Err(e) = sync_dir(&d) {
                tally.with(|s| s.fail(progress, "(a directory)", format!("fsync failed: {e}")));
            }
        }
        progress.advance(batch.len() as u64);
    };

    let (walked, panicked) = run_batches(
        opts.concurrency,
        |send| {
            let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
            let flush = |batch: &mut Vec<Item>| {
                if !batch.is_empty() {
                    tally.with(|s| s.kms_batches += 1);
                    send(std::mem::replace(batch, Vec::with_capacity(BATCH)));
                }
            };
            let walked = scope.walk(|dir, rel, listing| {
                let mut unsettled = Vec::new();
                if !opts.dry_run {
                    unsettled = super::rekey::settle_temps(dir, listing, &tally);
                }
                let shared = match dir.try_clone_to_owned() {
                    Ok(fd) => Arc::new(fd),
                    Err(e) => {
                        tally.with(|s| s.fail(progress, rel, format!("cannot open: {e}")));
                        return;
                    }
                };
                let mut skipped = 0;
                for name in &listing.files {
                    let path = file_path(rel, name);
                    if unsettled.iter().any(|u| u.as_slice() == name.as_bytes()) {
                        tally.with(|s| {
                            s.files += 1;
                            s.fail(progress, &path, super::rekey::UNSETTLED.into())
                        });
                        skipped += 1;
                        continue;
                    }
                    let header = match sidecar::read_at(dir.as_raw_fd(), name) {
                        Ok(h) => h,
                        Err(SidecarError::Missing) => {
                            tally.with(|s| {
                                s.files += 1;
                                s.plaintext += 1
                            });
                            skipped += 1;
                            continue;
                        }
                        Err(e) => {
                            tally.with(|s| {
                                s.files += 1;
                                s.fail(progress, &path, e.to_string())
                            });
                            skipped += 1;
                            continue;
                        }
                    };
                    let policy = scope.policy_index(&path);
                    let active = &scope.volume.policies[policy];
                    let current = |i: usize| versions[policy].get(i).cloned().flatten();
                    tally.with(|s| s.files += 1);
                    if !opts.all && keys.is_wrapped_as(&header.parsed.header, active, &current) {
                        tally.with(|s| s.up_to_date += 1);
                        skipped += 1;
                        continue;
                    }
                    if opts.dry_run {
                        tally.with(|s| s.changed += 1);
                        skipped += 1;
                        continue;
                    }
                    batch.push(Item {
                        entry: Entry {
                            dir: shared.clone(),
                            name: name.clone(),
                            path,
                            rel: rel.to_owned(),
                        },
                        header,
                        policy,
                    });
                    if batch.len() == BATCH {
                        flush(&mut batch);
                    }
                }
                progress.advance(skipped);
            });
            flush(&mut batch);
            walked
        },
        work,
    );
    walked?;
    tally.with(|s| s.failed += panicked);
    progress.finish();
    Ok(tally.finish())
}
