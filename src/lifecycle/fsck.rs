//! `kmsfs fsck`: checks a backing directory for what crashes, interrupted
//! commands and hands in the backing directory leave behind, and repairs
//! what is safe to repair. It prints nothing: it returns a [`FsckReport`]
//! with one [`Problem`] per finding.
//!
//! Without `verify` it reads metadata only (the directory listings, an
//! `fstatat` per file and each sidecar's few hundred bytes), directories
//! checked on several threads. With `verify` it also unwraps every header's
//! DEK through the KMS, in the batches `rewrap` uses (`FileKeys::verify`),
//! and checks that each file's first non-hole block authenticates under
//! its header. A file whose blocks do not is paired, if it can be, with the
//! header its blocks do authenticate under, among the sidecars of its
//! directory that have no file of their own or whose files do not fit them
//! either (the blocks are bound to the file ID in their header, so only the
//! right header fits).
//!
//! A repair holds the volume lock exclusively (every mount holds it
//! shared), the lifecycle lock and the migrate lock, so nothing else changes
//! the backing directory meanwhile. It removes orphan sidecars and leftover
//! temporary files (those of an interrupted `rekey` through `rekey`'s own
//! recovery, which first finishes a half-done swap), cuts torn tails back to
//! the last whole sealed block, and moves a fitting header over a file's
//! wrong or missing one. Data without a header that fits is never deleted.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use zeroize::Zeroizing;

use super::BATCH;
use super::{file_path, run_batches, LifecycleError, Progress, Scope, SharedDir, Summary, Tally};
use crate::config::{ConfigError, VolumeConfig};
use crate::crypto::BlockCipher;
use crate::format::block::{is_hole, BlockGeometry, BlockLayout};
use crate::format::header::{self as hdr, VERSION_1};
use crate::format::names::{
    sidecar_name, CONFIG_FILE, IK_DIR, LIFECYCLE_LOCK, LIFECYCLE_TEMP_PREFIX, LONG_SIDECAR_PREFIX,
    MIGRATE_JOURNAL, MIGRATE_LOCK_BASE, MIGRATE_TEMP_PREFIX, MOUNT_LOCK_BASE,
    MOUNT_READERS_LOCK_BASE, MOUNT_WRITERS_LOCK_BASE, SIDECAR_PREFIX, VOLUME_LOCK_BASE,
};
use crate::fs::error::FsError;
use crate::fs::sidecar::{self, FileHeader, SidecarError};
use crate::fs::sys;
use crate::fs::walk::{Kind, Listing};

/// Why a check could not run at all (a problem found is not one).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0} is in use by a kmsfs mount (it holds {0}/{VOLUME_LOCK_BASE}.lock); unmount it first (`kmsfs umount MOUNTPOINT`), then repair")]
    InUse(PathBuf),
    #[error("another `kmsfs migrate` is running on {0}; wait for it to end, then repair")]
    MigrateRunning(PathBuf),
    #[error("a `kmsfs migrate` of {0} stopped midway: run `kmsfs migrate {0}` (or `kmsfs migrate --rollback {0}`, whichever was running) to finish its last step, then repair")]
    MigrateUnfinished(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FsckError {
    /// Whether running the same command again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            FsckError::Lifecycle(e) => e.is_retryable(),
            FsckError::Config(e) => e.is_retryable(),
            FsckError::MigrateRunning(_) => true,
            _ => false,
        }
    }
}

/// How `fsck` runs.
#[derive(Clone, Debug)]
pub struct FsckOptions {
    /// Fix what is safe to fix (see the module documentation).
    pub repair: bool,
    /// Unwrap every header through the KMS and check its MAC, its key and
    /// the file's first block.
    pub verify: bool,
    /// Directories (and KMS batches) worked on at once.
    pub concurrency: usize,
}

impl Default for FsckOptions {
    fn default() -> Self {
        FsckOptions {
            repair: false,
            verify: false,
            concurrency: 4,
        }
    }
}

/// What is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A sidecar whose data file is missing or not a regular file.
    OrphanSidecar,
    /// A data file without a header (no sidecar, or an empty one) where a
    /// mount cannot read it as plaintext.
    MissingHeader,
    /// A sidecar that is not a regular file, is too large or does not
    /// parse.
    BadSidecar,
    /// A header whose block size is not the volume's.
    BlockSizeMismatch,
    /// A ciphertext size no whole number of sealed blocks makes.
    TornTail,
    /// A temporary file or intent record an interrupted command left.
    LeftoverTemp,
    /// `kmsfs migrate` stopped midway: its journal is there.
    UnfinishedMigrate,
    /// A reserved name kmsfs does not make.
    UnknownReserved,
    /// An entry that could not be read.
    Unreadable,
    /// (verify) A header under a key the file's policy does not allow.
    KeyNotAllowed,
    /// (verify) A DEK the KMS does not unwrap (unknown key, damaged wrap).
    UnwrapFailed,
    /// (verify) A header whose MAC does not match.
    BadHeaderMac,
    /// (verify) The KMS could not be asked: the file was not checked.
    KmsUnreachable,
    /// (verify) Data that does not authenticate under its header, and
    /// whose right header was found in another sidecar.
    MismatchedPair,
    /// (verify) Data that authenticates under no header in its directory.
    DamagedData,
    /// A recovery record that a mount resolves when it opens the file; not
    /// a problem.
    PendingRecovery,
}

impl ProblemKind {
    /// Whether this counts as a problem (exit status), not a note.
    pub fn is_problem(self) -> bool {
        self != ProblemKind::PendingRecovery
    }

    /// As the per-problem line shows it.
    pub fn label(self) -> &'static str {
        match self {
            ProblemKind::OrphanSidecar => "orphan sidecar",
            ProblemKind::MissingHeader => "no header",
            ProblemKind::BadSidecar => "bad sidecar",
            ProblemKind::BlockSizeMismatch => "wrong block size",
            ProblemKind::TornTail => "torn tail",
            ProblemKind::LeftoverTemp => "leftover temporary",
            ProblemKind::UnfinishedMigrate => "unfinished migrate",
            ProblemKind::UnknownReserved => "unknown reserved name",
            ProblemKind::Unreadable => "unreadable",
            ProblemKind::KeyNotAllowed => "key not allowed",
            ProblemKind::UnwrapFailed => "DEK does not unwrap",
            ProblemKind::BadHeaderMac => "bad header",
            ProblemKind::KmsUnreachable => "not verified",
            ProblemKind::MismatchedPair => "mismatched pair",
            ProblemKind::DamagedData => "damaged data",
            ProblemKind::PendingRecovery => "pending recovery record",
        }
    }
}

/// One finding.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// Relative to the backing directory, escaped (names are untrusted).
    pub path: String,
    pub detail: String,
    /// For a file paired with the wrong header or none: the sidecar whose
    /// header its data authenticates under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub right_pair: Option<String>,
    /// What `--repair` did about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<String>,
    /// Why `--repair` left it (when it tried or knows better).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_because: Option<String>,
}

/// What a check found and did, for people and for `--json`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FsckReport {
    /// The directory checked, inside the volume.
    pub dir: String,
    pub repair: bool,
    pub verify: bool,
    pub directories: u64,
    /// Regular files looked at.
    pub files: u64,
    /// Files without a sidecar that a non-mandatory policy passes through.
    pub plaintext: u64,
    /// Files whose header and first block were verified (with `verify`).
    pub verified: u64,
    pub kms_batches: u64,
    /// Problems found (pending recovery records are not counted).
    pub found: u64,
    pub repaired: u64,
    /// Problems found and not repaired.
    pub left: u64,
    /// Files that could not be verified because a KMS was unreachable.
    pub kms_unreachable: u64,
    pub seconds: f64,
    /// Every finding, by path.
    pub problems: Vec<Problem>,
}

impl FsckReport {
    pub fn clean(&self) -> bool {
        self.found == 0
    }
}

/// A header `verify` checks: where its file is, and its policy.
struct VerifyItem {
    dir: SharedDir,
    rel: String,
    name: OsString,
    /// Mount-relative (policies are matched on it).
    path: String,
    header: FileHeader,
    policy: usize,
}

/// A sidecar without its file.
struct Orphan {
    name: OsString,
    kind: Kind,
    /// Its header, when it parses (a candidate for pairing).
    header: Option<FileHeader>,
    problem: usize,
}

/// A data file whose header is wrong, missing or unusable.
struct Unpaired {
    name: OsString,
    /// Its own header, when it parses: the right one for another file,
    /// maybe (two sidecars swapped).
    header: Option<FileHeader>,
    /// Its problem; `None` for a file taken as plaintext pass-through, which
    /// becomes a problem only if a header fits it.
    problem: Option<usize>,
}

/// What pairing did in one directory.
struct Paired {
    /// Per orphan: it fits a file, so it stays (or was moved).
    used: Vec<bool>,
    renamed: bool,
    /// Files left without a fitting header, relative to the backing
    /// directory.
    unfitted: Vec<String>,
}

/// What the last phase looks at in one directory.
struct DirRecord {
    dir: SharedDir,
    orphans: Vec<Orphan>,
    unpaired: Vec<Unpaired>,
}

#[derive(Default)]
struct Counts {
    directories: u64,
    files: u64,
    plaintext: u64,
    verified: u64,
    kms_batches: u64,
}

/// Checks (and with `opts.repair`, repairs) the backing directory of
/// `scope` below `scope.dir`. Progress and lines go to `progress`.
pub fn fsck(
    scope: &Scope, opts: &FsckOptions, progress: &dyn Progress,
) -> Result<FsckReport, FsckError> {
    let started = Instant::now();
    let _locks = if opts.repair {
        Some(repair_locks(&scope.volume.backing)?)
    } else {
        None
    };
    let run = Run {
        scope,
        opts,
        keys: scope.file_keys(),
        shift: scope.volume.config.geometry_shift(),
        progress,
        problems: Mutex::new(Vec::new()),
        counts: Mutex::new(Counts::default()),
        to_verify: Mutex::new(Vec::new()),
        dirs: Mutex::new(HashMap::new()),
        settled: Tally::new(Summary::new("fsck", &scope.dir, false)),
    };
    progress.start(scope.count_files()?);
    let (walked, panicked) = run_batches(
        opts.concurrency,
        |send| {
            scope.walk(|dir, rel, listing| match dir.try_clone_to_owned() {
                Ok(fd) => send((Arc::new(fd), rel.to_owned(), listing.clone())),
                Err(e) => {
                    run.add(ProblemKind::Unreadable, rel, format!("cannot open: {e}"));
                }
            })
        },
        |(dir, rel, listing): (SharedDir, String, Listing)| run.check_dir(&dir, &rel, &listing),
    );
    walked?;
    let rest = std::mem::take(&mut *run.to_verify.lock().unwrap());
    if !rest.is_empty() {
        run.verify_batch(rest);
    }
    let dirs = std::mem::take(&mut *run.dirs.lock().unwrap());
    let mut dirs: Vec<(String, DirRecord)> = dirs.into_iter().collect();
    dirs.sort_by(|a, b| a.0.cmp(&b.0));
    // Pairs first, everywhere: whether an orphan may be removed depends on
    // what is left without a header in other directories.
    let mut paired = Vec::with_capacity(dirs.len());
    let mut unfitted: Vec<String> = Vec::new();
    for (rel, record) in &dirs {
        let outcome = run.pair_dir(rel, record);
        unfitted.extend(outcome.unfitted.iter().cloned());
        paired.push(outcome);
    }
    for ((rel, record), outcome) in dirs.iter().zip(paired) {
        run.clean_dir(rel, record, outcome, &unfitted);
    }
    progress.finish();
    let counts = run.counts.into_inner().unwrap();
    let mut problems = run.problems.into_inner().unwrap();
    if panicked > 0 {
        problems.push(Problem::new(
            ProblemKind::Unreadable,
            "(some directories)",
            format!("{panicked} directories could not be checked (a bug: see above); run it again"),
        ));
    }
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    let counted = problems.iter().filter(|p| p.kind.is_problem());
    let found = counted.clone().count() as u64;
    let repaired = counted.clone().filter(|p| p.repaired.is_some()).count() as u64;
    Ok(FsckReport {
        dir: scope.dir.clone(),
        repair: opts.repair,
        verify: opts.verify,
        directories: counts.directories,
        files: counts.files,
        plaintext: counts.plaintext,
        verified: counts.verified,
        kms_batches: counts.kms_batches,
        found,
        repaired,
        left: found - repaired,
        kms_unreachable: problems
            .iter()
            .filter(|p| p.kind == ProblemKind::KmsUnreachable)
            .count() as u64,
        seconds: started.elapsed().as_secs_f64(),
        problems,
    })
}

/// The locks a repair holds: the volume lock (no mount), the lifecycle
/// lock (no rewrap or rekey) and the migrate lock (no migrate), each
/// without waiting. A migrate that stopped midway must be finished first:
/// its temporary file may be the only copy of a file's data.
fn repair_locks(backing: &std::path::Path) -> Result<Vec<File>, FsckError> {
    let volume = VolumeConfig::try_lock_volume(backing, false)?
        .ok_or_else(|| FsckError::InUse(backing.to_owned()))?;
    let lifecycle = super::lock(backing)?;
    let base = backing.join(MIGRATE_LOCK_BASE);
    let migrate = crate::safe_open::try_lock_beside(&base, false)
        .map_err(|source| FsckError::Io {
            path: base.clone(),
            source,
        })?
        .ok_or_else(|| FsckError::MigrateRunning(backing.to_owned()))?;
    if std::fs::symlink_metadata(backing.join(MIGRATE_JOURNAL)).is_ok() {
        return Err(FsckError::MigrateUnfinished(backing.to_owned()));
    }
    Ok(vec![volume, lifecycle, migrate])
}

impl Problem {
    fn new(kind: ProblemKind, path: &str, detail: String) -> Self {
        Problem {
            kind,
            path: path.trim_start_matches('/').to_owned(),
            detail,
            right_pair: None,
            repaired: None,
            left_because: None,
        }
    }
}

/// What a reserved name in the backing root is.
enum RootName {
    /// The configuration, its backup, a lock.
    Known,
    /// A temporary file of an atomic rewrite (configuration, journal).
    Temp,
    Journal,
}

fn root_name(name: &[u8]) -> Option<RootName> {
    let is = |s: &str| name == s.as_bytes();
    let lock_of = |base: &str| name == format!("{base}.lock").as_bytes();
    let temp_of = |base: &str| name.starts_with(format!("{base}.tmp-").as_bytes());
    if is(CONFIG_FILE)
        || is(crate::config::upgrade::FORMAT_ONE_BACKUP)
        || is(LIFECYCLE_LOCK)
        || lock_of(CONFIG_FILE)
        || lock_of(MIGRATE_LOCK_BASE)
        || lock_of(VOLUME_LOCK_BASE)
        || lock_of(MOUNT_LOCK_BASE)
        || lock_of(MOUNT_WRITERS_LOCK_BASE)
        || lock_of(MOUNT_READERS_LOCK_BASE)
    {
        Some(RootName::Known)
    } else if is(MIGRATE_JOURNAL) {
        Some(RootName::Journal)
    } else if temp_of(CONFIG_FILE) || temp_of(MIGRATE_JOURNAL) {
        Some(RootName::Temp)
    } else {
        None
    }
}

/// PENDING RECOVERY RECORDS: the single place for the recovery records a
/// mount resolves when it opens a file (successor sidecars `.kmsfs+NAME`
/// and `.kmsfs%HEX`, and the truncate redo records in `.kmsfs-intents/`).
/// fsck knows them as kmsfs's own and leaves them to the mount; wire their
/// checks (and their repair) in here.
fn pending_recovery(name: &[u8], kind: Kind) -> Option<&'static str> {
    if name.starts_with(b".kmsfs+") || name.starts_with(b".kmsfs%") {
        Some("successor sidecar: pending recovery record, resolved by the mount on open")
    } else if name == b".kmsfs-intents" && kind == Kind::Directory {
        Some("truncate redo records: pending recovery record, resolved by the mount on open")
    } else {
        None
    }
}

/// What a temporary file of `rewrap` or `rekey` is, for its line.
fn lifecycle_temp_detail(name: &[u8]) -> &'static str {
    if name.ends_with(b".intent") {
        "intent record of an interrupted `kmsfs rekey`: the next `kmsfs rewrap`, `kmsfs rekey` or `kmsfs fsck --repair` finishes its swap"
    } else if name.ends_with(b".data") || name.ends_with(b".hdr") {
        "temporary copy of an interrupted `kmsfs rekey`"
    } else {
        "temporary header of an interrupted `kmsfs rewrap`"
    }
}

/// The running check's shared state.
struct Run<'a> {
    scope: &'a Scope<'a>,
    opts: &'a FsckOptions,
    keys: crate::fs::file_keys::FileKeys,
    /// The volume's block shift.
    shift: u8,
    progress: &'a dyn Progress,
    problems: Mutex<Vec<Problem>>,
    counts: Mutex<Counts>,
    /// Headers waiting for a KMS batch.
    to_verify: Mutex<Vec<VerifyItem>>,
    /// Directories with orphans or unpaired files, by path.
    dirs: Mutex<HashMap<String, DirRecord>>,
    /// What `rekey::settle_temps` counts.
    settled: Tally,
}

impl Run<'_> {
    /// Records a problem; returns its index.
    fn add(&self, kind: ProblemKind, path: &str, detail: String) -> usize {
        self.push(Problem::new(kind, path, detail))
    }

    fn push(&self, p: Problem) -> usize {
        let mut problems = self.problems.lock().unwrap();
        problems.push(p);
        problems.len() - 1
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut Problem)) {
        f(&mut self.problems.lock().unwrap()[i]);
    }

    /// Records what a repair did (`Ok`) or why it could not (`Err`).
    fn repaired(&self, i: usize, outcome: Result<String, String>) {
        self.update(i, |p| match outcome {
            Ok(done) => p.repaired = Some(done),
            Err(why) => p.left_because = Some(why),
        });
    }

    /// Adds a problem and, with `--repair`, runs `fix` for it.
    fn add_fixable(
        &self, kind: ProblemKind, path: &str, detail: String,
        fix: impl FnOnce() -> Result<String, String>,
    ) -> usize {
        let i = self.add(kind, path, detail);
        if self.opts.repair {
            self.repaired(i, fix());
        }
        i
    }

    fn record(
        &self, rel: &str, dir: &SharedDir,
    ) -> std::sync::MutexGuard<'_, HashMap<String, DirRecord>> {
        let mut dirs = self.dirs.lock().unwrap();
        dirs.entry(rel.to_owned()).or_insert_with(|| DirRecord {
            dir: dir.clone(),
            orphans: Vec::new(),
            unpaired: Vec::new(),
        });
        dirs
    }

    /// Notes file `name` of directory `rel` as lacking a header that fits
    /// it (`header`: the one it has), for pairing with the directory's
    /// orphan sidecars.
    fn add_unpaired(
        &self, rel: &str, dir: &SharedDir, name: &OsStr, header: Option<FileHeader>, problem: usize,
    ) {
        let mut dirs = self.record(rel, dir);
        dirs.get_mut(rel)
            .expect("just made")
            .unpaired
            .push(Unpaired {
                name: name.to_owned(),
                header,
                problem: Some(problem),
            });
    }

    /// The block geometry of a file with `header` (the volume's block size;
    /// the header's layout only where format 1 files may be, as a mount
    /// sizes them).
    fn geometry(&self, header: &hdr::ParsedHeader) -> BlockGeometry {
        let layout = if self.scope.volume.config.legacy_v1_files {
            header.header.geometry.layout()
        } else {
            BlockLayout::V2
        };
        BlockGeometry::new(self.shift, layout).expect("validated with the volume")
    }

    /// Checks one directory: its reserved names and its files.
    fn check_dir(&self, dir: &SharedDir, rel: &str, listing: &Listing) {
        let fd = dir.as_raw_fd();
        self.counts.lock().unwrap().directories += 1;
        self.check_lifecycle_temps(dir, rel, listing);
        let own: std::collections::HashSet<Vec<u8>> = listing
            .files
            .iter()
            .map(|f| sidecar_name(f.as_bytes()))
            .collect();
        let mut orphans = Vec::new();
        for (name, kind) in &listing.reserved {
            let b = name.as_bytes();
            let path = file_path(rel, name);
            if b.starts_with(LIFECYCLE_TEMP_PREFIX) && *kind == Kind::RegularFile {
                continue; // checked above
            }
            if b.starts_with(SIDECAR_PREFIX) || b.starts_with(LONG_SIDECAR_PREFIX) {
                if !own.contains(b) {
                    orphans.push(self.orphan(fd, &path, name, *kind));
                }
                continue;
            }
            if let Some(what) = pending_recovery(b, *kind) {
                self.add(ProblemKind::PendingRecovery, &path, what.into());
                continue;
            }
            match (rel, root_name(b)) {
                ("/", Some(RootName::Known)) => {}
                // The intermediate keys of directory key mode: kmsfs's own,
                // and files under them cannot be read without them.
                ("/", None) if b == IK_DIR.as_bytes() && *kind == Kind::Directory => {}
                ("/", Some(RootName::Journal)) => {
                    self.add(
                        ProblemKind::UnfinishedMigrate,
                        &path,
                        "a `kmsfs migrate` stopped midway (mounts refuse the volume until it is finished): run `kmsfs migrate BACKING` (or `--rollback`, whichever was running)".into(),
                    );
                }
                ("/", Some(RootName::Temp)) => {
                    self.add_fixable(
                        ProblemKind::LeftoverTemp,
                        &path,
                        "temporary file of an interrupted rewrite of the configuration or the migrate journal".into(),
                        || self.remove_root_temp(fd, name),
                    );
                }
                _ => {
                    self.add(
                        ProblemKind::UnknownReserved,
                        &path,
                        format!(
                            "a reserved name kmsfs does not make ({}); not removed, since it may come from a newer kmsfs: look at it and remove it by hand",
                            kind_name(*kind)
                        ),
                    );
                }
            }
        }
        let mut unpaired = Vec::new();
        let mut items = Vec::new();
        for name in &listing.files {
            self.check_file(dir, rel, name, &mut unpaired, &mut items);
        }
        let (checked, queued) = (listing.files.len() as u64, items.len() as u64);
        // Plaintext files matter only if a header here might be theirs.
        let headers_here = self.opts.verify && orphans.iter().any(|o| o.header.is_some());
        unpaired.retain(|u| u.problem.is_some() || headers_here);
        if !orphans.is_empty() || !unpaired.is_empty() {
            let mut dirs = self.record(rel, dir);
            let r = dirs.get_mut(rel).expect("just made");
            r.orphans.extend(orphans);
            r.unpaired.extend(unpaired);
        }
        self.progress.advance(checked - queued);
        if !items.is_empty() {
            // Full batches only; the rest waits for other directories.
            let full: Vec<Vec<VerifyItem>> = {
                let mut pending = self.to_verify.lock().unwrap();
                pending.extend(items);
                let mut full = Vec::new();
                while pending.len() >= BATCH {
                    let rest = pending.split_off(BATCH);
                    full.push(std::mem::replace(&mut *pending, rest));
                }
                full
            };
            for batch in full {
                self.verify_batch(batch);
            }
        }
    }

    /// The temporary files of `rewrap` and `rekey` in a directory: listed,
    /// and with `--repair` settled by `rekey`'s own recovery (which first
    /// finishes a swap its intent record describes) and removed.
    fn check_lifecycle_temps(&self, dir: &SharedDir, rel: &str, listing: &Listing) {
        if listing.temps.is_empty() {
            return;
        }
        if self.opts.repair {
            super::rekey::settle_temps(dir.as_fd(), listing, &self.settled);
        }
        for t in &listing.temps {
            let i = self.add(
                ProblemKind::LeftoverTemp,
                &file_path(rel, t),
                lifecycle_temp_detail(t.as_bytes()).into(),
            );
            if self.opts.repair {
                let gone = sys::cstr(t)
                    .and_then(|c| sys::fstatat(dir.as_raw_fd(), &c))
                    .is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT));
                self.repaired(
                    i,
                    if gone {
                        Ok("removed (after finishing the interrupted rekey swap it belonged to, if any)".into())
                    } else {
                        Err("kept: the interrupted rekey it belongs to could not be finished; run `kmsfs rekey BACKING` and read what it says".into())
                    },
                );
            }
        }
    }

    /// Removes a temporary file of an atomic rewrite in the backing root:
    /// under the configuration's lock, so no rewrite is under way.
    fn remove_root_temp(&self, fd: RawFd, name: &OsStr) -> Result<String, String> {
        let _lock = VolumeConfig::lock(&self.scope.volume.backing).map_err(|e| e.to_string())?;
        unlink(fd, name).map(|_| "removed".into())
    }

    /// A sidecar without its file: a problem, with `--repair` removed in
    /// the last phase unless it turns out to be another file's right
    /// header.
    fn orphan(&self, fd: RawFd, path: &str, name: &OsStr, kind: Kind) -> Orphan {
        let header = if kind == Kind::RegularFile {
            sidecar::read_exact_at(fd, &cstring(name))
                .ok()
                .and_then(|raw| {
                    hdr::parse(&raw)
                        .ok()
                        .map(|parsed| FileHeader { parsed, raw })
                })
        } else {
            None
        };
        let problem = self.add(
            ProblemKind::OrphanSidecar,
            path,
            match kind {
                Kind::RegularFile => "a sidecar whose data file is missing or not a regular file (an interrupted create, unlink or rename)".into(),
                other => format!("a {} under a sidecar's name, without a data file", kind_name(other)),
            },
        );
        Orphan {
            name: name.to_owned(),
            kind,
            header,
            problem,
        }
    }

    /// Checks one regular file: its sidecar, its header's block size, its
    /// size; queues its header for `verify`.
    fn check_file(
        &self, dir: &SharedDir, rel: &str, name: &OsString, unpaired: &mut Vec<Unpaired>,
        items: &mut Vec<VerifyItem>,
    ) {
        let fd = dir.as_raw_fd();
        let path = file_path(rel, name);
        if name.as_bytes().starts_with(MIGRATE_TEMP_PREFIX.as_bytes()) {
            self.add_fixable(
                ProblemKind::LeftoverTemp,
                &path,
                "temporary file of an interrupted `kmsfs migrate` (no migrate journal needs it once the migrate has finished)".into(),
                || {
                    unlink(fd, name)?;
                    sidecar::remove_at(fd, name).map_err(|e| e.to_string())?;
                    Ok("removed, with its sidecar".into())
                },
            );
            return;
        }
        let st = match sys::cstr(name).and_then(|c| sys::fstatat(fd, &c)) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st,
            // Gone or replaced since it was listed (a live mount).
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return,
            Err(e) => {
                self.add(ProblemKind::Unreadable, &path, e.to_string());
                return;
            }
        };
        self.counts.lock().unwrap().files += 1;
        let policy = self.scope.policy_index(&path);
        let mandatory = self.scope.volume.config.policies[policy].mandatory;
        let sidecar_path = file_path(rel, OsStr::from_bytes(&sidecar_name(name.as_bytes())));
        let raw = match sidecar::read_raw_at(fd, name) {
            Ok(raw) => raw,
            Err(SidecarError::Missing) => {
                let problem = if mandatory {
                    Some(self.add(
                        ProblemKind::MissingHeader,
                        &path,
                        "no sidecar, under a mandatory policy: it reads as EIO and cannot be decrypted without its header; not removed".into(),
                    ))
                } else if st.st_nlink > 1 {
                    Some(self.add(
                        ProblemKind::MissingHeader,
                        &path,
                        format!("no sidecar, and {} links, so a mount does not pass it through as plaintext (EIO)", st.st_nlink),
                    ))
                } else {
                    self.counts.lock().unwrap().plaintext += 1;
                    None
                };
                unpaired.push(Unpaired {
                    name: name.clone(),
                    header: None,
                    problem,
                });
                return;
            }
            Err(SidecarError::Io(e)) => {
                self.add(ProblemKind::Unreadable, &sidecar_path, e.to_string());
                return;
            }
            Err(e) => {
                self.add(
                    ProblemKind::BadSidecar,
                    &sidecar_path,
                    format!("{e}: the file reads as EIO"),
                );
                return;
            }
        };
        if raw.is_empty() && st.st_size == 0 {
            // What a power loss leaves of a new file never synced: nothing
            // to decrypt, and a mount gives it a header (`Core::give_header`).
            self.add(
                ProblemKind::PendingRecovery,
                &path,
                "an empty file whose header was never written (created just before a crash); a read-write mount gives it one when it is opened".into(),
            );
            return;
        }
        if raw.is_empty() {
            let problem = self.add(
                ProblemKind::MissingHeader,
                &path,
                "its sidecar is empty (a create that was never made durable): it reads as EIO and cannot be decrypted without its header; not removed".into(),
            );
            unpaired.push(Unpaired {
                name: name.clone(),
                header: None,
                problem: Some(problem),
            });
            return;
        }
        let parsed = match hdr::parse(&raw) {
            Ok(p) => p,
            Err(e) => {
                let problem = self.add(
                    ProblemKind::BadSidecar,
                    &sidecar_path,
                    format!("does not parse ({e}): the file reads as EIO"),
                );
                unpaired.push(Unpaired {
                    name: name.clone(),
                    header: None,
                    problem: Some(problem),
                });
                return;
            }
        };
        let h = &parsed.header;
        if h.geometry.shift() != self.shift {
            self.add(
                ProblemKind::BlockSizeMismatch,
                &sidecar_path,
                format!(
                    "its block size is {} bytes, the volume's {}: a mount refuses the file (EIO); it was copied from another volume",
                    h.geometry.block_size(),
                    1u64 << self.shift
                ),
            );
        }
        let geometry = self.geometry(&parsed);
        let size = st.st_size as u64;
        if geometry.has_torn_tail(size) {
            let keep = size - size % geometry.sealed_block_size() as u64;
            self.add_fixable(
                ProblemKind::TornTail,
                &path,
                format!(
                    "its last {} bytes are too few for a sealed block (a write or truncate cut short): reading there gives EIO",
                    size - keep
                ),
                || cut_tail(fd, name, st.st_ino, keep),
            );
        }
        if h.version() == VERSION_1 && !self.scope.volume.config.legacy_v1_files {
            self.add(
                ProblemKind::KeyNotAllowed,
                &sidecar_path,
                "a format 1 header in a volume that never had format 1 files: it was copied or planted here, and a mount refuses it".into(),
            );
            return;
        }
        if self.opts.verify {
            items.push(VerifyItem {
                dir: dir.clone(),
                rel: rel.to_owned(),
                name: name.clone(),
                path,
                header: FileHeader { parsed, raw },
                policy,
            });
        }
    }

    /// Verifies a batch of headers (see the module documentation).
    fn verify_batch(&self, batch: Vec<VerifyItem>) {
        let policies = &self.scope.volume.policies;
        let files: Vec<_> = batch
            .iter()
            .map(|it| (&it.header, &policies[it.policy], it.path.as_str()))
            .collect();
        let results = self.scope.rt.block_on(self.keys.verify(&files));
        self.counts.lock().unwrap().kms_batches += 1;
        for (it, result) in batch.iter().zip(results) {
            let sidecar_path = file_path(
                &it.rel,
                OsStr::from_bytes(&sidecar_name(it.name.as_bytes())),
            );
            let cipher = match result {
                Ok(c) => c,
                Err(e) => {
                    let why = strip_label(&e, &it.path);
                    let h = &it.header.parsed.header;
                    let (kind, unusable) = if !self.keys.allows(h, &policies[it.policy]) {
                        (ProblemKind::KeyNotAllowed, false)
                    } else if e.is_retryable() {
                        (ProblemKind::KmsUnreachable, false)
                    } else if matches!(e, FsError::Kms { .. }) {
                        (ProblemKind::UnwrapFailed, true)
                    } else {
                        (ProblemKind::BadHeaderMac, true)
                    };
                    let problem = self.add(kind, &sidecar_path, why);
                    if unusable {
                        self.add_unpaired(&it.rel, &it.dir, &it.name, None, problem);
                    }
                    continue;
                }
            };
            match fits(it.dir.as_raw_fd(), &it.name, &cipher) {
                Ok(true) => self.counts.lock().unwrap().verified += 1,
                Ok(false) => {
                    let problem = self.add(
                        ProblemKind::MismatchedPair,
                        &it.path,
                        "its first data block does not authenticate under its header (EIO on read): the header belongs to another file".into(),
                    );
                    let header = FileHeader {
                        parsed: it.header.parsed.clone(),
                        raw: it.header.raw.clone(),
                    };
                    self.add_unpaired(&it.rel, &it.dir, &it.name, Some(header), problem);
                }
                Err(e) => {
                    self.add(ProblemKind::Unreadable, &it.path, e.to_string());
                }
            }
        }
        self.progress.advance(batch.len() as u64);
    }

    /// With `verify`, finds for each file of `record` without a fitting
    /// header the sidecar that fits it, and with `--repair` moves it over.
    fn pair_dir(&self, rel: &str, record: &DirRecord) -> Paired {
        let mut used = vec![false; record.orphans.len()];
        let mut renamed = false;
        let mut fitting = Vec::new();
        if self.opts.verify && !record.unpaired.is_empty() {
            (renamed, fitting) = self.pair(rel, record, &mut used);
        }
        let unfitted = record
            .unpaired
            .iter()
            .enumerate()
            .filter(|(u, f)| f.problem.is_some() && fitting.get(*u).copied().flatten().is_none())
            .map(|(_, f)| file_path(rel, &f.name).trim_start_matches('/').to_owned())
            .collect();
        Paired {
            used,
            renamed,
            unfitted,
        }
    }

    /// With `--repair`, removes the orphans of `record` that are no file's
    /// header: those that are no header at all, and, once `verify` has
    /// tried them against every file of their directory without a fitting
    /// header, those no such file is left for anywhere in the volume (a
    /// rename across directories leaves the header in the old one).
    /// `unfitted` lists the files left without a fitting header.
    fn clean_dir(&self, rel: &str, record: &DirRecord, paired: Paired, unfitted: &[String]) {
        let fd = record.dir.as_raw_fd();
        let mut changed = paired.renamed;
        let here = |p: &&String| {
            let dir = p.rsplit_once('/').map_or("", |(d, _)| d);
            dir == rel.trim_start_matches('/')
        };
        let elsewhere = unfitted.iter().find(|p| !here(p));
        for (o, used) in record.orphans.iter().zip(&paired.used) {
            if !self.opts.repair || *used {
                continue;
            }
            let outcome = if o.kind == Kind::Directory {
                Err("a directory: look at it and remove it by hand".into())
            } else if o.header.is_some() && !self.opts.verify {
                Err("kept: it may be the header of a file renamed when kmsfs stopped, which only --verify can tell; run `kmsfs fsck --repair --verify`".into())
            } else if o.header.is_some() && self.scope.dir != "/" {
                Err("kept: it may be the header of a file outside the directory checked; check the whole volume".into())
            } else if let (true, Some(file)) = (o.header.is_some(), elsewhere) {
                Err(format!(
                    "kept: {file} has no header that fits it, and this may be its (a rename across directories cut short)"
                ))
            } else {
                changed = true;
                unlink(fd, &o.name).map(|_| "removed".into())
            };
            self.repaired(o.problem, outcome);
        }
        if changed {
            if let Err(e) = sys::fsync(fd) {
                self.add(ProblemKind::Unreadable, rel, format!("fsync failed: {e}"));
            }
        }
    }

    /// Pairs the unpaired files of `record` with the headers that fit them
    /// (see `pair_dir`); marks in `used` the orphans that fit a file (moved
    /// or not, they are kept). Returns whether anything was renamed, and
    /// for each unpaired file the candidate that fits it.
    fn pair(&self, rel: &str, record: &DirRecord, used: &mut [bool]) -> (bool, Vec<Option<usize>>) {
        let fd = record.dir.as_raw_fd();
        // Candidates: parsed orphans, and the headers of files that do not
        // fit them (two sidecars swapped).
        enum Owner {
            Orphan(usize),
            File(usize),
        }
        let mut candidates: Vec<(Owner, &FileHeader)> = Vec::new();
        for (i, o) in record.orphans.iter().enumerate() {
            if let Some(h) = &o.header {
                candidates.push((Owner::Orphan(i), h));
            }
        }
        for (i, u) in record.unpaired.iter().enumerate() {
            if let Some(h) = &u.header {
                candidates.push((Owner::File(i), h));
            }
        }
        if candidates.is_empty() {
            self.leave_unpaired(record, &[]);
            return (false, Vec::new());
        }
        // Every file of a directory is under one policy.
        let policy = self
            .scope
            .policy_index(&file_path(rel, &record.unpaired[0].name));
        let active = &self.scope.volume.policies[policy];
        let labels: Vec<String> = candidates
            .iter()
            .map(|(owner, _)| match owner {
                Owner::Orphan(i) => file_path(rel, &record.orphans[*i].name),
                Owner::File(i) => file_path(rel, &record.unpaired[*i].name),
            })
            .collect();
        let files: Vec<_> = candidates
            .iter()
            .zip(&labels)
            .map(|((_, h), label)| (*h, active, label.as_str()))
            .collect();
        let ciphers = self.scope.rt.block_on(self.keys.verify(&files));
        self.counts.lock().unwrap().kms_batches += 1;
        // fitting[u] = the candidate whose header file u's data fits.
        let mut fitting: Vec<Option<usize>> = vec![None; record.unpaired.len()];
        for (u, file) in record.unpaired.iter().enumerate() {
            if file.problem.is_none() && !record.orphans.iter().any(|o| o.header.is_some()) {
                continue; // plaintext, and no orphan header that could be its
            }
            fitting[u] = candidates.iter().zip(&ciphers).position(|((owner, _), c)| {
                !matches!(owner, Owner::File(i) if *i == u)
                    && c.as_ref()
                        .is_ok_and(|c| fits(fd, &file.name, c).unwrap_or(false))
            });
        }
        for c in fitting.iter().flatten() {
            if let Owner::Orphan(o) = candidates[*c].0 {
                used[o] = true;
            }
        }
        // An orphan the KMS could not be asked about was not tried: kept.
        for ((owner, _), cipher) in candidates.iter().zip(&ciphers) {
            if let (Owner::Orphan(o), Err(e)) = (owner, cipher) {
                if e.is_retryable() && !used[*o] {
                    used[*o] = true;
                    self.update(record.orphans[*o].problem, |p| {
                        p.left_because = Some(
                            "kept: the KMS could not be asked whether it is the header of a file here; run it again".into(),
                        )
                    });
                }
            }
        }
        let mut renamed = false;
        let mut done = vec![false; record.unpaired.len()];
        for u in 0..record.unpaired.len() {
            let Some(c) = fitting[u] else { continue };
            let file = &record.unpaired[u];
            let (source, right_pair) = match candidates[c].0 {
                Owner::Orphan(o) => (record.orphans[o].name.clone(), labels[c].clone()),
                Owner::File(f) => {
                    let s = sidecar_of(&record.unpaired[f].name);
                    let shown = file_path(rel, &s);
                    (s, shown)
                }
            };
            let problem = match file.problem {
                Some(p) => p,
                None => {
                    // Taken for plaintext, but it is ciphertext whose
                    // sidecar is under another name.
                    self.counts.lock().unwrap().plaintext -= 1;
                    self.add(
                        ProblemKind::MissingHeader,
                        &file_path(rel, &file.name),
                        "no sidecar: it is ciphertext whose header is under another name (an interrupted rename), so a mount serves its ciphertext as plaintext".into(),
                    )
                }
            };
            self.update(problem, |p| {
                if p.kind == ProblemKind::MismatchedPair || p.kind == ProblemKind::MissingHeader {
                    p.detail.push_str("; its right header is in ");
                    p.detail.push_str(right_pair.trim_start_matches('/'));
                }
                p.right_pair = Some(right_pair.trim_start_matches('/').to_owned());
            });
            if !self.opts.repair || done[u] {
                continue;
            }
            let target = sidecar_of(&file.name);
            let outcome = match candidates[c].0 {
                // The file's own header fits another unpaired file: moving
                // the orphan over it would lose that one's header.
                Owner::Orphan(_)
                    if file.header.is_some()
                        && fitting.iter().enumerate().any(|(v, f)| {
                            v != u && f.is_some_and(|f| matches!(candidates[f].0, Owner::File(x) if x == u))
                        }) =>
                {
                    Err("its own header fits another file; pair them by hand (rename the sidecars)".into())
                }
                Owner::Orphan(o) => {
                    let r = rename(fd, &source, &target, 0);
                    if r.is_ok() {
                        used[o] = true;
                        renamed = true;
                        self.repaired(
                            record.orphans[o].problem,
                            Ok(format!("moved over the sidecar of {}", file_path(rel, &file.name).trim_start_matches('/'))),
                        );
                    }
                    r.map(|_| format!("moved {} over its sidecar", right_pair.trim_start_matches('/')))
                }
                // Two files with each other's headers: exchanged.
                Owner::File(f) if fitting[f].is_some_and(|g| matches!(candidates[g].0, Owner::File(x) if x == u)) => {
                    let r = rename(fd, &source, &target, libc::RENAME_EXCHANGE);
                    if r.is_ok() {
                        renamed = true;
                        done[f] = true;
                        let shown = file_path(rel, &file.name);
                        if let Some(p) = record.unpaired[f].problem {
                            self.repaired(p, Ok(format!("exchanged its sidecar with that of {}", shown.trim_start_matches('/'))));
                        }
                    }
                    r.map(|_| {
                        format!(
                            "exchanged its sidecar with that of {}",
                            file_path(rel, &record.unpaired[f].name).trim_start_matches('/')
                        )
                    })
                }
                Owner::File(_) => Err("its right header is another file's, whose data fits neither; pair them by hand".into()),
            };
            done[u] = true;
            self.repaired(problem, outcome);
        }
        self.leave_unpaired(record, &fitting);
        if self.opts.repair {
            let fit = fitting
                .iter()
                .flatten()
                .filter_map(|c| match candidates[*c].0 {
                    Owner::Orphan(o) => Some(o),
                    Owner::File(_) => None,
                });
            for o in fit {
                self.update(record.orphans[o].problem, |p| {
                    if p.repaired.is_none() {
                        p.left_because = Some(
                            "kept: it is the right header of a file it could not be moved to"
                                .into(),
                        );
                    }
                });
            }
        }
        (renamed, fitting)
    }

    /// Files for which no header fits: a mismatched pair becomes damaged
    /// data, a file without a header stays as it is (never deleted).
    fn leave_unpaired(&self, record: &DirRecord, fitting: &[Option<usize>]) {
        for (u, file) in record.unpaired.iter().enumerate() {
            if fitting.get(u).copied().flatten().is_some() {
                continue;
            }
            if let Some(p) = file.problem {
                self.update(p, |p| {
                    if p.kind == ProblemKind::MismatchedPair {
                        p.kind = ProblemKind::DamagedData;
                        p.detail = "its first data block does not authenticate under its header, nor under any other sidecar in its directory: the data is damaged, or its header is lost".into();
                    }
                    if self.opts.repair && p.repaired.is_none() && p.left_because.is_none() {
                        p.left_because = Some("no header fits its data, and data without its header cannot be decrypted: left for you to restore from a backup or remove".into());
                    }
                });
            }
        }
    }
}

/// The sidecar name of file `name`.
fn sidecar_of(name: &OsStr) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    OsString::from_vec(sidecar_name(name.as_bytes()))
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Directory => "directory",
        Kind::RegularFile => "regular file",
        Kind::Other => "symlink or special file",
    }
}

/// `e` without the file label its message starts with.
fn strip_label(e: &FsError, label: &str) -> String {
    let s = e.to_string();
    match s.strip_prefix(label).and_then(|r| r.strip_prefix(": ")) {
        Some(rest) => rest.to_owned(),
        None => s,
    }
}

fn cstring(name: &OsStr) -> CString {
    // Names from a directory listing hold no NUL.
    CString::new(name.as_bytes()).expect("no NUL in a listed name")
}

fn unlink(dir: RawFd, name: &OsStr) -> Result<(), String> {
    match sys::unlinkat(dir, &cstring(name), 0) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(format!("cannot remove it: {e}")),
        _ => Ok(()),
    }
}

fn rename(dir: RawFd, from: &OsStr, to: &OsStr, flags: u32) -> Result<(), String> {
    sys::renameat2(dir, &cstring(from), dir, &cstring(to), flags)
        .map_err(|e| format!("cannot rename the sidecar: {e}"))
}

/// Opens data file `name` in `dir` for `flags`, checked to be a regular
/// file (the backing directory is untrusted).
fn open_data(dir: RawFd, name: &OsStr, flags: i32) -> std::io::Result<File> {
    let fd = sys::openat(
        dir,
        &cstring(name),
        flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        0,
    )?;
    let st = sys::fstat(fd.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(File::from(fd))
}

/// Cuts data file `name` (inode `ino`) back to `keep` bytes, durably.
fn cut_tail(dir: RawFd, name: &OsStr, ino: u64, keep: u64) -> Result<String, String> {
    let f = open_data(dir, name, libc::O_WRONLY).map_err(|e| format!("cannot open it: {e}"))?;
    let st = sys::fstat(f.as_raw_fd()).map_err(|e| e.to_string())?;
    if st.st_ino != ino {
        return Err("it was replaced meanwhile; run fsck again".into());
    }
    f.set_len(keep)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot cut it: {e}"))?;
    Ok(format!(
        "cut back to {keep} bytes, the last whole sealed block (the partial block never authenticated)"
    ))
}

/// Whether the first non-hole block of data file `name` authenticates
/// under `cipher` (true for a file with none). Holes are skipped with
/// SEEK_DATA where the filesystem has it.
fn fits(dir: RawFd, name: &OsStr, cipher: &BlockCipher) -> std::io::Result<bool> {
    let f = open_data(dir, name, libc::O_RDONLY)?;
    let geometry = cipher.geometry();
    let size = f.metadata()?.len();
    let sealed = geometry.sealed_block_size() as u64;
    let mut at = 0u64;
    while at < size {
        // SAFETY: plain syscall on a descriptor `f` keeps open.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        let data = if data < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => return Ok(true), // only holes from here
                _ => at,
            }
        } else {
            data as u64
        };
        let index = data / sealed;
        let start = index * sealed;
        let len = sealed.min(size.saturating_sub(start));
        if len <= geometry.overhead() as u64 {
            return Ok(true); // a torn tail only, reported as such
        }
        let mut block = vec![0u8; len as usize];
        f.read_exact_at(&mut block, start)?;
        if !is_hole(&block) {
            let mut out = Zeroizing::new(vec![0u8; block.len() - geometry.overhead()]);
            return Ok(cipher.open(index, &block, &mut out).is_ok());
        }
        at = start + sealed;
    }
    Ok(true)
}
