//! The key lifecycle over a backing directory, mounted or not:
//! - `rewrap`: each file's DEK wrapped again under its policy's current
//!   keys (a rotated version, another key or KMS, recipients added or
//!   dropped); data files untouched;
//! - `rekey`: a new DEK and file ID for each file, its data re-encrypted;
//! - `status`: which key and version each policy's files are under,
//!   from their headers alone.
//!
//! Both changing passes are idempotent (a file already as wanted is
//! skipped) and safe to kill at any moment: every replacement is one atomic
//! exchange of a fully written, fsynced file, and temporary files a killed
//! run leaves are removed by the next. One pass runs at a time per backing
//! directory (`.kmsfs-lifecycle.lock`).

pub mod fsck;
pub mod rekey;
pub mod rewrap;
pub mod status;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::audit::AuditLog;
use crate::cache::DekCache;
use crate::config::Volume;
use crate::fs::file_keys::FileKeys;
use crate::fs::walk::{self, Listing, WalkError};
use crate::fs::{escape_name, sys};
use crate::kms::{KmsError, KmsRuntime};
use crate::policy::is_within;
use crate::safe_open::NO_FOLLOW_FLAGS;

/// Files per KMS batch: Vault/OpenBao take at most 240 per request (see
/// `kms::vault`), so 2,000 files cost 9 unwrap and 9 wrap requests.
pub const BATCH: usize = 240;
/// Most failures a summary lists one by one (all are counted).
const FAILURES_LISTED: usize = 100;

/// Why a lifecycle pass could not run (a failure of one file is not one:
/// it is counted in the summary, and the pass goes on).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("another `kmsfs rewrap` or `kmsfs rekey` is running on {0} (it holds {0}/.kmsfs-lifecycle.lock); wait for it to end, then run this again")]
    Busy(PathBuf),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("cannot ask the KMS of {key} which key version is current: {source}")]
    KeyVersions {
        key: String,
        #[source]
        source: KmsError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LifecycleError {
    /// Whether running the same command again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            LifecycleError::Busy(_) => true,
            LifecycleError::KeyVersions { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}

/// What a pass works on: an opened volume, the directory (mount-relative,
/// normalized) below which it works, and where key operations are logged.
pub struct Scope<'a> {
    pub volume: &'a Volume,
    pub rt: &'a KmsRuntime,
    pub dir: String,
    pub audit: &'a AuditLog,
    /// Where the backing directory is mounted on this machine, if it is:
    /// `rekey` then replaces files through the mount (see `rekey`).
    pub mountpoint: Option<PathBuf>,
}

impl Scope<'_> {
    /// Keys as the mount handles them, with a cache too small to matter
    /// (a pass meets each DEK once).
    fn file_keys(&self) -> FileKeys {
        FileKeys::new(
            DekCache::new(1, std::time::Duration::from_secs(1)),
            self.volume.id(),
            self.volume.config.legacy_v1_files,
        )
    }

    /// Index of the policy governing mount-relative `path`.
    fn policy_index(&self, path: &str) -> usize {
        crate::policy::governing(&self.volume.config.policies, path)
    }

    /// Walks the directories of the scope (and their ancestors, which are
    /// listed but whose files are left out), calling `visit(dir, rel,
    /// listing)` for those within it.
    fn walk(
        &self, mut visit: impl FnMut(BorrowedFd<'_>, &str, &Listing),
    ) -> Result<(), LifecycleError> {
        let dir = self.dir.clone();
        walk::walk_scoped(
            &self.volume.backing,
            |rel| is_within(rel, &dir) || is_within(&dir, rel),
            |fd, rel, listing| {
                if is_within(rel, &dir) {
                    visit(fd, rel, listing)
                }
            },
        )?;
        Ok(())
    }

    /// How many regular files the scope holds (a listing-only pass, for
    /// the progress bar's total).
    fn count_files(&self) -> Result<u64, LifecycleError> {
        let mut n = 0;
        self.walk(|_, _, listing| n += listing.files.len() as u64)?;
        Ok(n)
    }
}

/// Mount-relative path of `name` in directory `rel`, escaped for display
/// (names in the backing directory are untrusted text). Policies are
/// matched on it too, so it must stay a plain path where escaping changes
/// nothing.
fn file_path(rel: &str, name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut raw = if rel == "/" {
        Vec::new()
    } else {
        rel.as_bytes().to_vec()
    };
    raw.push(b'/');
    raw.extend_from_slice(name.as_bytes());
    escape_name(&raw)
}

/// Where a pass reports progress: a terminal bar, plain lines, or nothing.
pub trait Progress: Sync {
    /// The number of files the pass will look at.
    fn start(&self, total: u64);
    /// `n` more files looked at.
    fn advance(&self, n: u64);
    /// A line to show now (a failure), without breaking the bar.
    fn note(&self, line: &str);
    fn finish(&self);
}

/// No progress reporting (tests, library use).
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn note(&self, _: &str) {}
    fn finish(&self) {}
}

/// A file a pass could not handle, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileFailure {
    pub path: String,
    pub error: String,
}

/// What a pass did, for people and for `--json`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Summary {
    pub operation: &'static str,
    pub dir: String,
    pub dry_run: bool,
    /// Regular files looked at.
    pub files: u64,
    /// Files changed (rewrapped or rekeyed); with `dry_run`, that would be.
    pub changed: u64,
    /// Files already as wanted.
    pub up_to_date: u64,
    /// Files without a sidecar (plaintext under a policy that allows it).
    pub plaintext: u64,
    /// Files skipped because a mount has them open (rekey); a rerun
    /// takes them.
    pub busy: u64,
    /// Files changed by someone else while the pass worked on them, left
    /// as they were; a rerun takes them.
    pub changed_meanwhile: u64,
    pub failed: u64,
    /// Of the failures, those a retry may fix (a KMS unreachable or slow).
    pub retryable: u64,
    /// KMS batch calls made (each is one request where the KMS has a
    /// batch API).
    pub kms_batches: u64,
    /// Leftover temporary files of a killed run, removed.
    pub temps_removed: u64,
    pub seconds: f64,
    /// The first failures, one by one.
    pub failures: Vec<FileFailure>,
}

impl Summary {
    fn new(operation: &'static str, dir: &str, dry_run: bool) -> Self {
        Summary {
            operation,
            dir: dir.to_owned(),
            dry_run,
            ..Default::default()
        }
    }

    /// Whether every file in scope ended as wanted.
    pub fn complete(&self) -> bool {
        self.failed == 0 && self.busy == 0 && self.changed_meanwhile == 0
    }

    fn fail(&mut self, progress: &dyn Progress, path: &str, error: String) {
        // Errors about a file mostly name it already.
        let error = match error.strip_prefix(path).and_then(|e| e.strip_prefix(": ")) {
            Some(rest) => rest.to_owned(),
            None => error,
        };
        progress.note(&format!("kmsfs: {path}: {error}"));
        self.failed += 1;
        if self.failures.len() < FAILURES_LISTED {
            self.failures.push(FileFailure {
                path: path.to_owned(),
                error,
            });
        }
    }
}

/// The running pass's shared state.
struct Tally {
    summary: Mutex<Summary>,
    started: Instant,
}

impl Tally {
    fn new(summary: Summary) -> Self {
        Tally {
            summary: Mutex::new(summary),
            started: Instant::now(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Summary) -> R) -> R {
        f(&mut self.summary.lock().unwrap())
    }

    fn finish(self) -> Summary {
        let mut s = self.summary.into_inner().unwrap();
        s.seconds = self.started.elapsed().as_secs_f64();
        s
    }
}

/// Makes the entries of directory `dir` durable.
fn sync_dir(dir: &OwnedFd) -> std::io::Result<()> {
    sys::fsync(dir.as_raw_fd())
}

/// A directory handle shared by the files of one batch.
type SharedDir = Arc<OwnedFd>;

/// One pass at a time per backing directory: an exclusive lock on
/// `.kmsfs-lifecycle.lock`, held until the returned file drops.
fn lock(backing: &Path) -> Result<File, LifecycleError> {
    let path = backing.join(crate::format::names::LIFECYCLE_LOCK);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(NO_FOLLOW_FLAGS)
        .open(&path)
        .map_err(|source| LifecycleError::Io {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            LifecycleError::Busy(backing.to_owned())
        } else {
            LifecycleError::Io { path, source: e }
        });
    }
    Ok(file)
}

/// Runs `work` on `concurrency` threads over the batches `produce` sends
/// (at most `concurrency` waiting at a time), then returns what `produce`
/// returned and how many batches failed unexpectedly (panicked).
fn run_batches<B: Send, R>(
    concurrency: usize, produce: impl FnOnce(&dyn Fn(B)) -> R, work: impl Fn(B) + Sync,
) -> (R, u64) {
    let concurrency = concurrency.max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<B>(concurrency);
    let rx = Mutex::new(rx);
    let failed_batches = Mutex::new(0u64);
    let out = std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| loop {
                let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                match next {
                    // A batch that panics is reported (the panic message
                    // goes to stderr) and the worker goes on, so the walk
                    // never waits on a worker that is gone.
                    Ok(batch) => {
                        let work = std::panic::AssertUnwindSafe(|| work(batch));
                        if std::panic::catch_unwind(work).is_err() {
                            eprintln!("kmsfs: a batch of files failed unexpectedly; run the command again");
                            *failed_batches.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        }
                    }
                    Err(_) => break,
                }
            });
        }
        let send = |b: B| {
            let _ = tx.send(b);
        };
        let out = produce(&send);
        drop(tx);
        out
    });
    (
        out,
        failed_batches
            .into_inner()
            .unwrap_or_else(|e| e.into_inner()),
    )
}

/// A name in a directory of the pass.
struct Entry {
    dir: SharedDir,
    name: OsString,
    /// Mount-relative, escaped for display.
    path: String,
    /// The directory's path in the volume, as the walk gives it.
    rel: String,
}

/// A file a pass works on: where it is, its header, and the index of its
/// policy.
struct Item {
    entry: Entry,
    header: crate::fs::sidecar::FileHeader,
    policy: usize,
}

/// The files of `batch` as `FileKeys` takes them.
fn key_files<'a>(
    scope: &'a Scope, batch: &'a [Item],
) -> Vec<crate::fs::file_keys::LifecycleFile<'a>> {
    batch
        .iter()
        .map(|it| {
            (
                &it.header,
                &scope.volume.policies[it.policy],
                it.entry.path.as_str(),
            )
        })
        .collect()
}
