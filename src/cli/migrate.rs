//! `kmsfs migrate DIR`: turns a plaintext directory into a backing
//! directory in place, file by file, and `kmsfs migrate --rollback DIR`
//! turns it back. Every file is encrypted (or decrypted) through
//! [`kmsfs::Volume`], the mount's own `Core`, into a temporary name beside
//! it, then renamed over its name; an intent record in the backing
//! directory lets the next run finish or undo a step a kill interrupted.
//! docs/MIGRATE.md describes the procedure and its crash windows.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use kmsfs::config::{Calls, VolumeConfig};
use kmsfs::format::names::{is_reserved, sidecar_name, CONFIG_FILE};
use kmsfs::fs::{sidecar, walk};
use kmsfs::safe_open::{lock_beside, write_atomically};
use kmsfs::volume::{Metadata, Options, Volume, VolumeError};

use super::kms_args::KmsArgs;
use super::lifecycle::progress;
use super::mountinfo::mountpoint_of;
use super::{absolute, init, print_json, trust, RetryLater};

#[derive(Args)]
pub struct MigrateArgs {
    /// The directory to encrypt in place (it becomes the backing directory).
    dir: PathBuf,
    /// Decrypt every file back in place, then remove every kmsfs file
    /// (sidecars, configuration, journal).
    #[arg(long)]
    rollback: bool,
    /// Once every file is encrypted, make the root policy mandatory (files
    /// without a sidecar no longer read as plaintext).
    #[arg(long, conflicts_with = "rollback")]
    mandatory: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// The file format, when DIR is not a volume yet.
    #[command(flatten)]
    format: init::FormatArgs,
    // Last (see KmsArgs). Needed only when DIR is not a volume yet.
    #[command(flatten)]
    kms: Box<KmsArgs>,
}

/// The intent record: the one file step under way (files are done one at a
/// time). A reserved name, so a mount never shows it.
const JOURNAL: &str = kmsfs::format::names::MIGRATE_JOURNAL;

/// Why `backing` must not be mounted yet, if a migrate or rollback of it
/// stopped midway: the file it was converting may be between its two
/// renames (ciphertext without its sidecar, which a mount would serve as
/// plaintext bytes) until the next run finishes it.
pub(super) fn unfinished(backing: &Path) -> Option<String> {
    std::fs::symlink_metadata(backing.join(JOURNAL)).ok()?;
    Some(format!(
        "a `kmsfs migrate` of {0} stopped midway (or is running): run `kmsfs migrate {0}` \
         (or `kmsfs migrate --rollback {0}`, whichever was running) to finish its last step, \
         then mount",
        backing.display()
    ))
}
/// `lock_beside` this name: one migrate or rollback per directory at once.
const LOCK_BASE: &str = kmsfs::format::names::MIGRATE_LOCK_BASE;
/// Temporary files: beside the file they replace, created through the
/// volume (whose reserved names cannot be created), so not reserved; 128
/// random bits make them unguessable.
const TEMP_PREFIX: &str = kmsfs::format::names::MIGRATE_TEMP_PREFIX;
/// Copy buffer.
const CHUNK: usize = 1 << 20;

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Op {
    Encrypt,
    Decrypt,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// The temporary file is being written; the file is untouched.
    Copying,
    /// The temporary file is complete and durable; it is being renamed
    /// over the file.
    Renaming,
}

/// One journalled step. Paths are bytes (hex): names need not be UTF-8.
#[derive(Serialize, Deserialize)]
struct Intent {
    op: Op,
    phase: Phase,
    /// The directory, as a path inside the volume.
    dir_hex: String,
    name_hex: String,
    temp: String,
}

impl Intent {
    fn dir(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(OsString::from_vec(hex::decode(
            &self.dir_hex,
        )?)))
    }
    fn name(&self) -> Result<OsString> {
        Ok(OsString::from_vec(hex::decode(&self.name_hex)?))
    }
}

/// The journal file of directory `root`.
struct Journal {
    path: PathBuf,
    root: PathBuf,
}

impl Journal {
    fn new(root: &Path) -> Self {
        Journal {
            path: root.join(JOURNAL),
            root: root.to_owned(),
        }
    }

    fn read(&self) -> Result<Option<Intent>> {
        let Some(mut f) = kmsfs::safe_open::open_no_follow(&self.path)? else {
            return Ok(None);
        };
        if !f.metadata()?.is_file() {
            bail!("{} is not a regular file; remove it", self.path.display());
        }
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        let intent = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a migrate journal (damaged?); look at it and remove it",
                self.path.display()
            )
        })?;
        Ok(Some(intent))
    }

    fn write(&self, intent: &Intent) -> Result<()> {
        write_atomically(&self.path, &serde_json::to_vec(intent)?, 0o600)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn clear(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", self.path.display()))
            }
            _ => {}
        }
        fsync_dir(&open_dir(&self.root, Path::new("/"))?)
    }
}

/// What a run did; printed as JSON with --json.
#[derive(Serialize, Default)]
struct Summary {
    operation: &'static str,
    dir: String,
    /// The directory was made a volume by this run.
    initialised: bool,
    /// Regular files looked at.
    files: u64,
    /// Encrypted (or decrypted) by this run.
    changed: u64,
    /// Already encrypted (migrate) or plaintext (rollback).
    already_done: u64,
    /// Plaintext files with more than one link, left as they are.
    hard_linked: u64,
    /// Files written to while being copied, left as they were (run again).
    changed_meanwhile: u64,
    failed: u64,
    /// Of `failed`, those a retry may fix (a KMS unreachable).
    retryable: u64,
    /// A step a killed run left half done was finished or undone.
    recovered: bool,
    /// The root policy is mandatory now (migrate --mandatory).
    mandatory: bool,
    /// kmsfs files removed at the end of a rollback.
    kmsfs_files_removed: u64,
    seconds: f64,
}

pub fn migrate_cmd(a: MigrateArgs) -> Result<()> {
    let started = Instant::now();
    let root = absolute(&a.dir)?;
    let meta =
        std::fs::metadata(&root).with_context(|| format!("cannot migrate {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    if let Some(mnt) = mountpoint_of(&root) {
        bail!(
            "{} is mounted at {}; unmount it first (`kmsfs umount {}`): migrate changes the backing directory under the mount",
            root.display(),
            mnt.display(),
            mnt.display()
        );
    }
    let mut summary = Summary {
        operation: if a.rollback { "rollback" } else { "migrate" },
        dir: root.display().to_string(),
        ..Summary::default()
    };
    let is_volume = std::fs::symlink_metadata(VolumeConfig::path(&root)).is_ok();
    if !a.rollback && !is_volume {
        refuse_reserved_names(&root)?;
    }
    let _lock = lock_beside(&root.join(LOCK_BASE))
        .with_context(|| format!("cannot lock {}", root.display()))?;
    if a.rollback {
        rollback(&root, &mut summary)?;
    } else {
        if std::fs::symlink_metadata(VolumeConfig::path(&root)).is_err() {
            init::create_volume(&root, &a.format, &a.kms, false)?;
            summary.initialised = true;
        }
        migrate(&root, a.mandatory, &mut summary)?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    report(&summary, a.json)
}

/// Encrypts every plaintext file of volume `root`.
fn migrate(root: &Path, mandatory: bool, summary: &mut Summary) -> Result<()> {
    let journal = Journal::new(root);
    let mut volume = None;
    if let Some(intent) = journal.read()? {
        let opened = open(root)?;
        recover(&opened, root, &intent)?;
        journal.clear()?;
        summary.recovered = true;
        volume = Some(opened);
    }
    let work = survey(root, Op::Encrypt, summary)?;
    if !work.is_empty() {
        refuse_mandatory_over(root, &work)?;
        let volume = match volume.take() {
            Some(v) => v,
            None => open(root)?,
        };
        run_pass(&volume, root, &journal, Op::Encrypt, &work, summary);
    }
    drop(volume);
    finish_migrate(root, mandatory, summary)
}

/// Plaintext files under a mandatory policy cannot be read through the
/// volume: such a policy must be made not mandatory first.
fn refuse_mandatory_over(root: &Path, work: &[Work]) -> Result<()> {
    let (config, _rt) = trust::open_volume(root, &Calls::Once)?;
    // The policy of a file's directory decides, as in the mount.
    let governing = |w: &Work| config.config.policy_for(&w.dir.to_string_lossy());
    if let Some(p) = work.iter().map(governing).find(|p| p.mandatory) {
        bail!(
            "the policy for {} is mandatory, so its plaintext files cannot be read while they wait: make it not mandatory first (`kmsfs policy set {} {} --provider {} --key {} --not-mandatory`), then run migrate again",
            p.dir,
            root.display(),
            p.dir,
            p.key.provider,
            p.key.id
        );
    }
    Ok(())
}

/// With `--mandatory` and nothing left to do: the root policy becomes
/// mandatory.
fn finish_migrate(root: &Path, mandatory: bool, summary: &mut Summary) -> Result<()> {
    let left = summary.failed + summary.hard_linked + summary.changed_meanwhile;
    if mandatory && left == 0 {
        set_mandatory(root, true, |dir| dir == "/")?;
        summary.mandatory = true;
    } else {
        let (config, _rt) = trust::open_volume(root, &Calls::Once)?;
        summary.mandatory = config.config.root().mandatory;
    }
    Ok(())
}

/// Decrypts every encrypted file of volume `root`, then removes every
/// kmsfs file.
fn rollback(root: &Path, summary: &mut Summary) -> Result<()> {
    let journal = Journal::new(root);
    let is_volume = std::fs::symlink_metadata(VolumeConfig::path(root)).is_ok();
    if !is_volume {
        // A rollback killed after it removed the configuration: only
        // leftovers remain, unless files are still encrypted.
        let work = survey(root, Op::Decrypt, summary)?;
        if let Some(w) = work.first() {
            bail!(
                "{} has no kmsfs configuration, but {} is still encrypted (it has a sidecar); nothing can decrypt it here",
                root.display(),
                w.path_str()
            );
        }
        summary.kmsfs_files_removed = remove_kmsfs_files(root)?;
        return Ok(());
    }
    // Plaintext must stay readable under its name while the rest waits.
    set_mandatory(root, false, |_| true)?;
    let volume = open(root)?;
    if let Some(intent) = journal.read()? {
        recover(&volume, root, &intent)?;
        journal.clear()?;
        summary.recovered = true;
    }
    let work = survey(root, Op::Decrypt, summary)?;
    run_pass(&volume, root, &journal, Op::Decrypt, &work, summary);
    drop(volume);
    if summary.failed + summary.changed_meanwhile == 0 {
        summary.kmsfs_files_removed = remove_kmsfs_files(root)?;
    }
    Ok(())
}

/// Opens the volume through the mount's `Core`.
fn open(root: &Path) -> Result<Volume> {
    let options = Options {
        config: Some(trust::path()),
        ..Options::default()
    };
    Volume::open_with(root, &options).map_err(|e| {
        // Its KMS cause is not a link of the chain (transparent): say
        // "retry" here.
        if e.is_retryable() {
            RetryLater(e.to_string()).into()
        } else {
            e.into()
        }
    })
}

/// Sets `mandatory` on every policy whose directory `which` selects.
fn set_mandatory(root: &Path, mandatory: bool, which: impl Fn(&str) -> bool) -> Result<()> {
    let _lock = VolumeConfig::lock(root)?;
    let (mut volume, rt) = trust::open_volume(root, &Calls::Once)?;
    let change: Vec<_> = volume
        .config
        .policies
        .iter()
        .filter(|p| p.mandatory != mandatory && which(&p.dir))
        .cloned()
        .collect();
    let trusted = trust::load()?;
    for mut policy in change {
        policy.mandatory = mandatory;
        volume.set_policy(policy, &trusted, &rt, false)?;
    }
    Ok(())
}

/// A file to encrypt or decrypt.
struct Work {
    /// Its directory, as a path inside the volume.
    dir: PathBuf,
    name: OsString,
}

impl Work {
    fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }
    /// For messages (names are untrusted: escaped).
    fn path_str(&self) -> String {
        self.path().to_string_lossy().escape_debug().to_string()
    }
}

/// The regular files of `root` that `op` has to change, counting the
/// others in `summary`: for Encrypt, plaintext files with one link (those
/// with more are counted as `hard_linked`); for Decrypt, files with a
/// sidecar.
fn survey(root: &Path, op: Op, summary: &mut Summary) -> Result<Vec<Work>> {
    let mut work = Vec::new();
    let mut failure = None;
    let mut files = 0;
    walk::walk(root, |dir, rel, names| {
        if failure.is_some() {
            return;
        }
        for name in names {
            files += 1;
            let st = match stat_at(dir.as_raw_fd(), name) {
                Ok(st) => st,
                // Gone since it was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    failure = Some(e);
                    return;
                }
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                continue;
            }
            let encrypted = match stat_at(
                dir.as_raw_fd(),
                OsStr::from_bytes(&sidecar_name(name.as_bytes())),
            ) {
                Ok(_) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => {
                    failure = Some(e);
                    return;
                }
            };
            let item = Work {
                dir: PathBuf::from(rel),
                name: name.clone(),
            };
            match (op, encrypted) {
                (Op::Encrypt, false) if st.st_nlink > 1 => {
                    summary.hard_linked += 1;
                    eprintln!(
                        "kmsfs migrate: {} has {} hard links; left as it is (a mount does not serve it either): give each name its own copy (`cp -p NAME NAME.new && mv NAME.new NAME`) and run migrate again",
                        item.path_str(),
                        st.st_nlink
                    );
                }
                (Op::Encrypt, false) | (Op::Decrypt, true) => work.push(item),
                _ => summary.already_done += 1,
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e).with_context(|| format!("cannot look at the files of {}", root.display()));
    }
    summary.files = files;
    Ok(work)
}

/// Encrypts or decrypts each of `work`, with progress; failures are
/// counted and reported, never fatal to the others.
fn run_pass(
    volume: &Volume, root: &Path, journal: &Journal, op: Op, work: &[Work], summary: &mut Summary,
) {
    let bar = progress(summary.operation);
    bar.start(work.len() as u64);
    let crash = Failpoint::from_env();
    for (done, item) in work.iter().enumerate() {
        let outcome = convert(volume, root, journal, op, item, &|at| {
            crash.check(done as u64, at)
        });
        match outcome {
            Ok(Converted::Done) => summary.changed += 1,
            Ok(Converted::ChangedMeanwhile) => {
                summary.changed_meanwhile += 1;
                bar.note(&format!(
                    "kmsfs {}: {} changed while it was copied; left as it was (run again)",
                    summary.operation,
                    item.path_str()
                ));
            }
            Err(e) => {
                summary.failed += 1;
                if e.downcast_ref::<VolumeError>()
                    .is_some_and(VolumeError::is_retryable)
                {
                    summary.retryable += 1;
                }
                // A volume error names the file already.
                let what = match e.downcast_ref::<VolumeError>() {
                    Some(v) => v.to_string(),
                    None => format!("{}: {e:#}", item.path_str()),
                };
                bar.note(&format!("kmsfs {}: {what}", summary.operation));
            }
        }
        bar.advance(1);
        crash.check(done as u64 + 1, "");
    }
    bar.finish();
}

enum Converted {
    Done,
    ChangedMeanwhile,
}

/// One file: copy into a temporary name (encrypted, or plaintext), give it
/// the file's attributes, make it durable, then rename it over the file.
fn convert(
    volume: &Volume, root: &Path, journal: &Journal, op: Op, item: &Work, crash: &dyn Fn(&str),
) -> Result<Converted> {
    let path = item.path();
    let temp = temp_name();
    let temp_path = item.dir.join(&temp);
    let before = volume.metadata(&path)?;
    let mut intent = Intent {
        op,
        phase: Phase::Copying,
        dir_hex: hex::encode(item.dir.as_os_str().as_bytes()),
        name_hex: hex::encode(item.name.as_bytes()),
        temp: temp.clone(),
    };
    journal.write(&intent)?;
    let dir = open_dir(root, &item.dir)?;
    let copied = match op {
        Op::Encrypt => encrypt_copy(volume, &path, &temp_path, &before),
        Op::Decrypt => decrypt_copy(volume, &path, dir.as_raw_fd(), &temp, &before),
    };
    let after = volume.metadata(&path);
    let unchanged = matches!(&after, Ok(a) if same_file_state(&before, a));
    if copied.is_err() || !unchanged {
        remove_temp(dir.as_raw_fd(), OsStr::new(&temp))?;
        journal.clear()?;
        copied?;
        after?;
        return Ok(Converted::ChangedMeanwhile);
    }
    crash("copied");
    intent.phase = Phase::Renaming;
    journal.write(&intent)?;
    crash("renaming");
    volume.rename(&temp_path, &path)?;
    fsync_dir(&dir)?;
    journal.clear()?;
    Ok(Converted::Done)
}

/// Encrypts plaintext file `path` into new file `temp` through the volume.
fn encrypt_copy(volume: &Volume, path: &Path, temp: &Path, before: &Metadata) -> Result<()> {
    let mut src = volume.open_file(path)?;
    let mut dst = volume.create_with_mode(temp, 0o600)?;
    copy(&mut src, &mut dst)?;
    for name in volume.list_xattr(path)? {
        volume.set_xattr(temp, &name, &volume.get_xattr(path, &name)?)?;
    }
    let made = dst.metadata()?;
    if (made.uid, made.gid) != (before.uid, before.gid) {
        volume.set_owner(temp, Some(before.uid), Some(before.gid))?;
    }
    // After the owner: chown clears set-ID bits.
    volume.set_permissions(temp, before.mode)?;
    volume.set_times(temp, before.atime, before.mtime)?;
    dst.sync_all()?;
    dst.close()?;
    Ok(())
}

/// Decrypts file `path` through the volume into new plaintext file `temp`
/// of backing directory `dir`.
fn decrypt_copy(
    volume: &Volume, path: &Path, dir: RawFd, temp: &str, before: &Metadata,
) -> Result<()> {
    let mut src = volume.open_file(path)?;
    let c = CString::new(temp)?;
    // SAFETY: a valid C string; the descriptor is owned from here on.
    let fd = unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("cannot create a temporary file");
    }
    // SAFETY: openat returned a new descriptor.
    let mut dst = unsafe { File::from_raw_fd(fd) };
    copy(&mut src, &mut dst)?;
    for name in volume.list_xattr(path)? {
        let value = volume.get_xattr(path, &name)?;
        let n = CString::new(name.as_bytes())?;
        // SAFETY: valid name and buffer for the descriptor.
        let r = unsafe { libc::fsetxattr(fd, n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if r != 0 {
            return Err(io::Error::last_os_error()).context("cannot copy an extended attribute");
        }
    }
    let made = dst.metadata()?;
    let check = |r: i32, what: &str| -> Result<()> {
        if r != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("cannot set the {what}"));
        }
        Ok(())
    };
    // SAFETY: plain calls on an open descriptor.
    unsafe {
        // The created file's own owner: a set-group-ID directory gives it
        // the directory's group.
        if (made.uid(), made.gid()) != (before.uid, before.gid) {
            check(libc::fchown(fd, before.uid, before.gid), "owner")?;
        }
        check(libc::fchmod(fd, before.mode), "mode")?;
        let times = [timespec(before.atime), timespec(before.mtime)];
        check(libc::futimens(fd, times.as_ptr()), "times")?;
    }
    dst.sync_all()?;
    Ok(())
}

fn copy(src: &mut impl Read, dst: &mut impl Write) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all(&buf[..n])?;
    }
}

/// Whether nothing wrote to the file while it was copied.
fn same_file_state(a: &Metadata, b: &Metadata) -> bool {
    (a.ino, a.size, a.mtime, a.ctime, a.kind) == (b.ino, b.size, b.mtime, b.ctime, b.kind)
}

/// Finishes or undoes the step `intent` records.
fn recover(volume: &Volume, root: &Path, intent: &Intent) -> Result<()> {
    let rel = intent.dir()?;
    let name = intent.name()?;
    let temp = OsString::from(&intent.temp);
    let plain_name = |n: &[u8]| !n.is_empty() && n != b"." && n != b".." && !n.contains(&b'/');
    if !intent.temp.starts_with(TEMP_PREFIX)
        || !plain_name(intent.temp.as_bytes())
        || !plain_name(name.as_bytes())
        || is_reserved(name.as_bytes())
    {
        bail!("the migrate journal in {} names no temporary file of migrate; look at it and remove it", root.display());
    }
    let dir = open_dir(root, &rel)?;
    let dfd = dir.as_raw_fd();
    let temp_exists = exists_at(dfd, &temp)?;
    match (intent.phase, intent.op) {
        // The file itself is untouched: the temporary goes.
        (Phase::Copying, _) => remove_temp(dfd, &temp)?,
        // Complete and durable: the rename is done again.
        (Phase::Renaming, _) if temp_exists => volume.rename(rel.join(&temp), rel.join(&name))?,
        // The data was renamed; its sidecar follows.
        (Phase::Renaming, Op::Encrypt) => {
            let temp_sidecar = OsString::from_vec(sidecar_name(temp.as_bytes()));
            if exists_at(dfd, &temp_sidecar)? {
                sidecar::rename_at(dfd, &temp, dfd, &name, 0)?;
            }
        }
        // The plaintext was renamed; the encrypted file's header goes.
        (Phase::Renaming, Op::Decrypt) => {
            sidecar::remove_at(dfd, &name)?;
        }
    }
    fsync_dir(&dir)
}

/// Removes a temporary file and its sidecar, if there.
fn remove_temp(dir: RawFd, temp: &OsStr) -> Result<()> {
    let c = CString::new(temp.as_bytes())?;
    // SAFETY: a valid C string.
    if unsafe { libc::unlinkat(dir, c.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e).context("cannot remove a temporary file");
        }
    }
    sidecar::remove_at(dir, temp)?;
    Ok(())
}

/// Refuses a plaintext directory holding names kmsfs reserves: a mount
/// would hide them, and a rollback would remove them.
fn refuse_reserved_names(root: &Path) -> Result<()> {
    let mut found = None;
    let mut failure = None;
    walk::walk(root, |dir, rel, _| {
        if found.is_some() || failure.is_some() {
            return;
        }
        match reserved_entries(dir) {
            Ok(names) => {
                // The locks a first run that failed (a wrong KMS flag, say)
                // may have left are ours.
                let ours = |n: &OsString| {
                    rel == "/"
                        && [format!("{LOCK_BASE}.lock"), format!("{CONFIG_FILE}.lock")]
                            .iter()
                            .any(|l| n == l.as_str())
                };
                if let Some(n) = names.iter().find(|n| !ours(n)) {
                    found = Some(format!(
                        "{}/{}",
                        rel.trim_end_matches('/'),
                        n.to_string_lossy().escape_debug()
                    ));
                }
            }
            Err(e) => failure = Some(e),
        }
    })?;
    if let Some(e) = failure {
        return Err(e).with_context(|| format!("cannot list {}", root.display()));
    }
    if let Some(name) = found {
        bail!(
            "{} holds {name}: names starting with .kmsfs are kmsfs's own (hidden in a mount); rename it, then run migrate again",
            root.display()
        );
    }
    Ok(())
}

/// Removes every kmsfs file below `root` (sidecars, leftovers), then its
/// configuration, then the journal and locks: the end of a rollback.
fn remove_kmsfs_files(root: &Path) -> Result<u64> {
    let mut removed = 0;
    let mut failure = None;
    let last = [CONFIG_FILE, JOURNAL];
    let lock = format!("{LOCK_BASE}.lock");
    walk::walk(root, |dir, rel, _| {
        let names = match reserved_entries(dir) {
            Ok(n) => n,
            Err(e) => {
                failure.get_or_insert(e);
                return;
            }
        };
        for n in names {
            if rel == "/" && (last.iter().any(|l| n == *l) || n == *lock) {
                continue;
            }
            match unlink_at(dir.as_raw_fd(), &n) {
                Ok(()) => removed += 1,
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e)
            .with_context(|| format!("cannot remove kmsfs files below {}", root.display()));
    }
    let rootfd = open_dir(root, Path::new("/"))?;
    // The configuration last but the lock we hold: until it goes, a killed
    // rollback is run again as a rollback of a volume.
    for n in last.iter().copied().chain([lock.as_str()]) {
        match unlink_at(rootfd.as_raw_fd(), OsStr::new(n)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove {}", root.join(n).display()))
            }
        }
    }
    fsync_dir(&rootfd)?;
    Ok(removed)
}

/// The reserved names in directory `dir` that are not directories.
fn reserved_entries(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        let e = e?;
        if is_reserved(e.file_name().as_bytes()) && !e.file_type()?.is_dir() {
            out.push(e.file_name());
        }
    }
    Ok(out)
}

/// Prints the summary and turns what was left into the exit code.
fn report(s: &Summary, json: bool) -> Result<()> {
    if json {
        print_json(s)?;
    } else {
        eprintln!(
            "kmsfs {}: {} files in {}: {} {}, already done {}, hard-linked (left) {}, changed meanwhile {}, failed {}{}{}; {:.1} s",
            s.operation,
            s.files,
            s.dir,
            if s.operation == "migrate" { "encrypted" } else { "decrypted" },
            s.changed,
            s.already_done,
            s.hard_linked,
            s.changed_meanwhile,
            s.failed,
            if s.recovered { "; an interrupted step was completed" } else { "" },
            if s.kmsfs_files_removed > 0 {
                format!("; {} kmsfs files removed", s.kmsfs_files_removed)
            } else {
                String::new()
            },
            s.seconds
        );
    }
    if s.failed > 0 && s.failed == s.retryable {
        return Err(RetryLater(format!(
            "{} files could not be {}ed because a KMS was unreachable or slow (listed above); run it again",
            s.failed,
            s.operation.trim_end_matches('e')
        ))
        .into());
    }
    if s.failed + s.hard_linked > 0 {
        bail!(
            "{} files were left as they are (listed above); fix what each says and run `kmsfs migrate{}` again",
            s.failed + s.hard_linked,
            if s.operation == "rollback" { " --rollback" } else { "" }
        );
    }
    if s.changed_meanwhile > 0 {
        return Err(RetryLater(format!(
            "{} files were written to while they were copied and were left as they were; run it again",
            s.changed_meanwhile
        ))
        .into());
    }
    if s.operation == "migrate" && !s.mandatory {
        eprintln!(
            "kmsfs migrate: every file is encrypted; files without a sidecar still read as plaintext until the root policy is mandatory (`kmsfs migrate --mandatory {}`)",
            s.dir
        );
    }
    Ok(())
}

/// `.~kmsfs-migrate.` + 32 random hex digits.
fn temp_name() -> String {
    let mut tag = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut tag);
    format!("{TEMP_PREFIX}{}", hex::encode(tag))
}

/// A handle on directory `rel` (a path inside the volume) of `root`,
/// reached component by component without following symlinks.
fn open_dir(root: &Path, rel: &Path) -> Result<OwnedFd> {
    let open = |at: RawFd, name: &[u8], extra: i32| -> io::Result<OwnedFd> {
        let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid C string; the descriptor is owned from here on.
        let fd = unsafe {
            libc::openat(
                at,
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | extra,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat returned a new descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    // The root is the user's own path: symlinks in it are theirs.
    let mut dir = open(libc::AT_FDCWD, root.as_os_str().as_bytes(), 0)
        .with_context(|| format!("cannot open {}", root.display()))?;
    for part in rel.components() {
        if let std::path::Component::Normal(name) = part {
            dir = open(dir.as_raw_fd(), name.as_bytes(), libc::O_NOFOLLOW).with_context(|| {
                format!(
                    "cannot open directory {} in {}",
                    rel.display(),
                    root.display()
                )
            })?;
        }
    }
    Ok(dir)
}

fn fsync_dir(dir: &OwnedFd) -> Result<()> {
    // SAFETY: fsync of an open descriptor.
    if unsafe { libc::fsync(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error()).context("cannot make a directory durable");
    }
    Ok(())
}

fn stat_at(dir: RawFd, name: &OsStr) -> io::Result<libc::stat> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string and an out-parameter of the right type.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

fn exists_at(dir: RawFd, name: &OsStr) -> Result<bool> {
    match stat_at(dir, name) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn unlink_at(dir: RawFd, name: &OsStr) -> io::Result<()> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string.
    if unsafe { libc::unlinkat(dir, c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn timespec(t: SystemTime) -> libc::timespec {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// A test hook (`KMSFS_MIGRATE_CRASH=N` or `N:copied` or `N:renaming`):
/// the process kills itself with SIGKILL after N files, or at that point
/// of file N+1, as a crash or `kill -9` would end it.
struct Failpoint(Option<(u64, String)>);

impl Failpoint {
    fn from_env() -> Self {
        let spec = std::env::var("KMSFS_MIGRATE_CRASH").ok();
        Failpoint(spec.and_then(|s| {
            let (n, at) = s.split_once(':').unwrap_or((&s, ""));
            Some((n.parse().ok()?, at.to_owned()))
        }))
    }

    fn check(&self, done: u64, at: &str) {
        if self.0.as_ref().is_some_and(|(n, p)| *n == done && p == at) {
            // SAFETY: signals this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
