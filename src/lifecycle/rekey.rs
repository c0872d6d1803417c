//! `kmsfs rekey`: a new DEK and file ID for each file, its data decrypted
//! and encrypted again (the answer to a leaked DEK). One file at a time
//! needs space for its new copy.
//!
//! While the backing directory is mounted on this machine, each file is
//! replaced through the mount instead: its plaintext copied to a new file
//! there (which the mount creates as any new file: a fresh DEK and file ID
//! under the policy's keys), its mode, owner, times and extended
//! attributes copied, and renamed over the old one. The mount then knows
//! the old object is gone (an unrelated file may later reuse its backing
//! inode number, which the mount keys inodes by), keeps serving readers
//! that have it open, and makes the rename as crash-safe as any rename.
//! Files open in the mount are skipped (busy) as below. A killed run may
//! leave a `.HEX.kmsfs-rekey-tmp` file in the mount; the next run removes it.
//!
//! Unmounted, a file is two objects, so its swap is two exchanges, made
//! safe three ways:
//! - against a crash: an intent record (the new copies' inode numbers),
//!   durable before the first exchange and removed after the last, lets
//!   the next pass (`settle_temps`) finish a half-done swap: the header is
//!   exchanged first, so "new header, old data" means "exchange the data
//!   too", and "old header" means "nothing happened";
//! - against a mount's opens: the swap holds an exclusive `flock` on the old
//!   and the new data file, and a mount reads a header only under a shared
//!   lock on its data file, checking afterwards that the name still leads to
//!   it (else ESTALE: the kernel looks the name up again);
//! - against writers: a mount holds its shared lock for as long as it has
//!   the file open, so a file open in a mount is skipped ("busy"; a rerun
//!   takes it), and a file changed since it was read (size, mtime, ctime)
//!   is left as it is.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{
    file_path, lock, run_batches, Entry, LifecycleError, Progress, Scope, Summary, Tally, BATCH,
};
use crate::audit::{AuditEvent, AuditOp, AuditOutcome};
use crate::crypto::BlockCipher;
use crate::format::names::{sidecar_name, LIFECYCLE_TEMP_PREFIX};
use crate::fs::crypt_file::CryptFile;
use crate::fs::file_keys::NewFile;
use crate::fs::sidecar::{self, FileHeader, SidecarError};
use crate::fs::sys;
use crate::fs::walk::Listing;

/// Plaintext copied per step.
const CHUNK: usize = 1 << 20;
/// Suffix of the new copies a rekey through a mount makes (as
/// `.HEX.kmsfs-rekey-tmp`, so they are hidden files of the mount).
pub const MOUNT_TEMP_SUFFIX: &str = ".kmsfs-rekey-tmp";

/// Whether `name` is one of a rekey's new copies in a mount.
fn is_mount_temp(name: &[u8]) -> bool {
    name.len() == 1 + 24 + MOUNT_TEMP_SUFFIX.len()
        && name.starts_with(b".")
        && name.ends_with(MOUNT_TEMP_SUFFIX.as_bytes())
}
const INTENT_MAGIC: &str = "kmsfs rekey intent 1";

/// How `rekey` runs.
#[derive(Clone, Debug)]
pub struct RekeyOptions {
    pub dry_run: bool,
    /// Files re-encrypted at once.
    pub concurrency: usize,
}

impl Default for RekeyOptions {
    fn default() -> Self {
        RekeyOptions {
            dry_run: false,
            concurrency: 2,
        }
    }
}

/// How one file's rekey ended, short of an error.
enum Outcome {
    Done {
        new: Box<FileHeader>,
    },
    /// Open in a mount.
    Busy,
    /// Changed or replaced meanwhile.
    Changed,
}

/// The temporary names of the rekey of `name`: new data, new header,
/// intent record.
struct TempNames {
    data: CString,
    header: CString,
    intent: CString,
}

impl TempNames {
    fn of(name: &[u8]) -> TempNames {
        let tag = hex::encode(&Sha256::digest(name)[..16]);
        let make = |suffix: &str| {
            let mut n = LIFECYCLE_TEMP_PREFIX.to_vec();
            n.extend_from_slice(format!("rk-{tag}.{suffix}").as_bytes());
            CString::new(n).expect("no NUL")
        };
        TempNames {
            data: make("data"),
            header: make("hdr"),
            intent: make("intent"),
        }
    }

    fn remove(&self, dir: RawFd) {
        for n in [&self.data, &self.header, &self.intent] {
            let _ = sys::unlinkat(dir, n, 0);
        }
    }
}

fn cstr_of(name: &[u8]) -> std::io::Result<CString> {
    sys::cstr(OsStr::from_bytes(name))
}

fn try_lock(fd: RawFd, how: i32) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor the caller holds open.
    if unsafe { libc::flock(fd, how | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn unlock(fd: RawFd) {
    // SAFETY: as above.
    unsafe { libc::flock(fd, libc::LOCK_UN) };
}

fn ino_at(dir: RawFd, name: &CString) -> Option<u64> {
    sys::fstatat(dir, name).ok().map(|st| st.st_ino)
}

fn exchange(dir: RawFd, a: &CString, b: &CString) -> std::io::Result<()> {
    sys::renameat2(dir, a, dir, b, libc::RENAME_EXCHANGE)
}

/// Whether two stats show the same, unchanged file.
fn unchanged(a: &libc::stat, b: &libc::stat) -> bool {
    (
        a.st_ino,
        a.st_size,
        a.st_mtime,
        a.st_mtime_nsec,
        a.st_ctime,
        a.st_ctime_nsec,
    ) == (
        b.st_ino,
        b.st_size,
        b.st_mtime,
        b.st_mtime_nsec,
        b.st_ctime,
        b.st_ctime_nsec,
    )
}

/// Copies the user-visible extended attributes of `from` to `to`.
fn copy_xattrs(from: &File, to: &File) -> std::io::Result<()> {
    let (src, dst) = (sys::proc_path(from), sys::proc_path(to));
    let names = sys::listxattr(&src, true)?;
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let n = CString::new(name).expect("split at NUL");
        let value = sys::getxattr(&src, true, &n)?;
        sys::setxattr(&dst, true, &n, &value, 0)?;
    }
    Ok(())
}

/// Finishes or undoes the rekey swaps a killed pass left in `dir` (see the
/// module documentation), then removes every leftover temporary file.
/// Needs no KMS: only names and inode numbers.
pub(super) fn settle_temps(dir: BorrowedFd<'_>, listing: &Listing, tally: &Tally) {
    let fd = dir.as_raw_fd();
    for t in listing
        .temps
        .iter()
        .filter(|t| t.as_bytes().ends_with(b".intent"))
    {
        if let Some((name, data_ino, header_ino)) = read_intent(fd, t) {
            let Ok(c) = cstr_of(&name) else { continue };
            let Ok(sc) = cstr_of(&sidecar_name(&name)) else {
                continue;
            };
            let temps = TempNames::of(&name);
            let header_swapped = ino_at(fd, &sc) == Some(header_ino);
            let data_swapped = ino_at(fd, &c) == Some(data_ino);
            let data_waiting = ino_at(fd, &temps.data) == Some(data_ino);
            let repaired = match (header_swapped, data_swapped) {
                (true, false) if data_waiting => exchange(fd, &temps.data, &c).is_ok(),
                // Not this pass's order, but undone all the same.
                (false, true) => exchange(fd, &temps.data, &c).is_ok(),
                _ => false,
            };
            if repaired {
                tracing::warn!(
                    "finished the swap of a rekey that was interrupted: {}",
                    crate::fs::escape_name(&name)
                );
            }
            let _ = sys::fsync(fd);
        }
    }
    for t in &listing.temps {
        if let Ok(c) = sys::cstr(t) {
            if sys::unlinkat(fd, &c, 0).is_ok() {
                tally.with(|s| s.temps_removed += 1);
            }
        }
    }
    let _ = sys::fsync(fd);
}

/// The (name, new data inode, new header inode) an intent record holds.
fn read_intent(dir: RawFd, intent: &OsString) -> Option<(Vec<u8>, u64, u64)> {
    let c = sys::cstr(intent).ok()?;
    let fd = sys::openat(
        dir,
        &c,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    )
    .ok()?;
    let mut text = String::new();
    File::from(fd).take(4096).read_to_string(&mut text).ok()?;
    let mut lines = text.lines();
    if lines.next()? != INTENT_MAGIC {
        return None;
    }
    let name = hex::decode(lines.next()?.strip_prefix("name=")?).ok()?;
    let data = lines.next()?.strip_prefix("data_ino=")?.parse().ok()?;
    let header = lines.next()?.strip_prefix("header_ino=")?.parse().ok()?;
    // The intent's own name must be the one of this name's rekey.
    (TempNames::of(&name).intent.as_bytes() == intent.as_bytes()).then_some((name, data, header))
}

/// Writes `bytes` to new temporary file `name` in `dir`, durably.
fn write_temp(dir: RawFd, name: &CString, bytes: &[u8]) -> std::io::Result<File> {
    let fd = sys::openat(
        dir,
        name,
        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NOCTTY,
        0o600,
    )?;
    let mut f = File::from(fd);
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(f)
}

/// Re-encrypts one file and swaps it in (see the module documentation).
fn rekey_one(
    entry: &Entry, old_header: &FileHeader, old_cipher: BlockCipher, new: NewFile,
) -> Result<Outcome, String> {
    let dir = entry.dir.as_raw_fd();
    let name = entry.name.as_bytes();
    let c = cstr_of(name).map_err(|e| e.to_string())?;
    let sc = cstr_of(&sidecar_name(name)).map_err(|e| e.to_string())?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let data = match sys::openat(dir, &c, flags, 0) {
        Ok(fd) => File::from(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Outcome::Changed),
        Err(e) => return Err(format!("cannot open its data: {e}")),
    };
    let st0 = sys::fstat(data.as_raw_fd()).map_err(|e| e.to_string())?;
    if st0.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(Outcome::Changed);
    }
    if st0.st_nlink != 1 {
        return Err(
            "has several hard links; rekey makes a new file, which would split them: \
                    left as it is"
                .into(),
        );
    }
    if !try_lock(data.as_raw_fd(), libc::LOCK_EX).map_err(|e| e.to_string())? {
        return Ok(Outcome::Busy);
    }
    unlock(data.as_raw_fd());

    let temps = TempNames::of(name);
    temps.remove(dir);
    let result = (|| -> Result<Outcome, String> {
        fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
            move |e| format!("{what}: {e}")
        }
        let old = CryptFile::new(
            data.try_clone().map_err(io("dup"))?,
            old_cipher,
            entry.path.clone(),
            None,
        )
        .map_err(io("reading its size"))?;
        let size = old.size().map_err(|e| e.to_string())?;
        let fd = sys::openat(
            dir,
            &temps.data,
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NOCTTY,
            0o600,
        )
        .map_err(io("creating the new copy"))?;
        let new_file = File::from(fd);
        let copy = CryptFile::new(
            new_file.try_clone().map_err(io("dup"))?,
            new.cipher,
            entry.path.clone(),
            None,
        )
        .map_err(io("the new copy"))?;
        let mut buf = Vec::with_capacity(CHUNK);
        let mut offset = 0u64;
        while offset < size {
            let n = CHUNK.min((size - offset) as usize);
            old.read(offset, n, &mut buf).map_err(|e| e.to_string())?;
            if buf.is_empty() {
                break;
            }
            copy.write(offset, &buf).map_err(|e| e.to_string())?;
            offset += buf.len() as u64;
        }
        if size > offset {
            return Err("its data ended before the size its header and length imply".into());
        }
        copy.sync(false).map_err(|e| e.to_string())?;
        drop(copy);
        let nfd = new_file.as_raw_fd();
        sys::fchownat(nfd, st0.st_uid, st0.st_gid).map_err(io("chown of the new copy"))?;
        sys::fchmod(nfd, st0.st_mode & 0o7777).map_err(io("chmod of the new copy"))?;
        copy_xattrs(&data, &new_file).map_err(io("copying extended attributes"))?;
        let times = [
            libc::timespec {
                tv_sec: st0.st_atime,
                tv_nsec: st0.st_atime_nsec,
            },
            libc::timespec {
                tv_sec: st0.st_mtime,
                tv_nsec: st0.st_mtime_nsec,
            },
        ];
        sys::futimens(nfd, &times).map_err(io("setting times on the new copy"))?;
        new_file.sync_all().map_err(io("fsync of the new copy"))?;
        let header_file = write_temp(dir, &temps.header, &new.header.raw)
            .map_err(io("writing the new header"))?;
        let data_ino = sys::fstat(nfd).map_err(|e| e.to_string())?.st_ino;
        let header_ino = sys::fstat(header_file.as_raw_fd())
            .map_err(|e| e.to_string())?
            .st_ino;
        let intent = format!(
            "{INTENT_MAGIC}\nname={}\ndata_ino={data_ino}\nheader_ino={header_ino}\n",
            hex::encode(name)
        );
        write_temp(dir, &temps.intent, intent.as_bytes())
            .map_err(io("writing the intent record"))?;
        sys::fsync(dir).map_err(io("fsync of the directory"))?;

        // The swap, under exclusive locks on the old and the new data.
        if !try_lock(data.as_raw_fd(), libc::LOCK_EX).map_err(|e| e.to_string())? {
            return Ok(Outcome::Busy);
        }
        let now = sys::fstat(data.as_raw_fd()).map_err(|e| e.to_string())?;
        if !unchanged(&st0, &now) || ino_at(dir, &c) != Some(st0.st_ino) {
            return Ok(Outcome::Changed);
        }
        try_lock(nfd, libc::LOCK_EX).map_err(|e| e.to_string())?;
        exchange(dir, &temps.header, &sc).map_err(io("exchanging the header"))?;
        let swapped_out = sidecar::read_exact_at(dir, &temps.header);
        if !matches!(&swapped_out, Ok(raw) if *raw == old_header.raw) {
            exchange(dir, &temps.header, &sc).map_err(io("exchanging the header back"))?;
            return Ok(Outcome::Changed);
        }
        exchange(dir, &temps.data, &c).map_err(io("exchanging the data"))?;
        Ok(Outcome::Done {
            new: Box::new(new.header),
        })
    })();
    // Old data and header (after a swap) or the unused new copies.
    temps.remove(dir);
    let _ = sys::fsync(dir);
    result
}

/// Rekeys one file through the mount at `mountpoint` (see the module
/// documentation). `rel` is the file's directory inside the volume.
fn rekey_through_mount(entry: &Entry, rel: &str, mountpoint: &Path) -> Result<Outcome, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let name = std::str::from_utf8(entry.name.as_bytes())
        .map_err(|_| "its name is not UTF-8; rekey it with the volume unmounted".to_string())?;
    let dir = entry.dir.as_raw_fd();
    let c = cstr_of(entry.name.as_bytes()).map_err(|e| e.to_string())?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let data = match sys::openat(dir, &c, flags, 0) {
        Ok(fd) => File::from(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Outcome::Changed),
        Err(e) => return Err(format!("cannot open its data: {e}")),
    };
    let st0 = sys::fstat(data.as_raw_fd()).map_err(|e| e.to_string())?;
    if st0.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(Outcome::Changed);
    }
    if st0.st_nlink != 1 {
        return Err(
            "has several hard links; rekey makes a new file, which would split them: \
                    left as it is"
                .into(),
        );
    }
    // The mount holds a shared lock while it has the file open.
    if !try_lock(data.as_raw_fd(), libc::LOCK_EX).map_err(|e| e.to_string())? {
        return Ok(Outcome::Busy);
    }
    unlock(data.as_raw_fd());
    let mdir = mountpoint.join(rel.trim_start_matches('/'));
    let target = mdir.join(name);
    let tmp = {
        use rand::RngCore;
        let mut tag = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut tag);
        mdir.join(format!(".{}{MOUNT_TEMP_SUFFIX}", hex::encode(tag)))
    };
    let result = (|| -> Result<Outcome, String> {
        let mut src =
            File::open(&target).map_err(|e| format!("reading it through the mount: {e}"))?;
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("creating its new copy in the mount: {e}"))?;
        std::io::copy(&mut src, &mut dst).map_err(|e| format!("copying it: {e}"))?;
        drop(src);
        copy_xattrs(&data, &dst).map_err(|e| format!("copying extended attributes: {e}"))?;
        std::os::unix::fs::fchown(&dst, Some(st0.st_uid), Some(st0.st_gid))
            .map_err(|e| format!("chown of the new copy: {e}"))?;
        let mode = std::fs::Permissions::from_mode(st0.st_mode & 0o7777);
        dst.set_permissions(mode)
            .map_err(|e| format!("chmod of the new copy: {e}"))?;
        let at =
            |s: i64, ns: i64| std::time::UNIX_EPOCH + std::time::Duration::new(s as u64, ns as u32);
        let times = std::fs::FileTimes::new()
            .set_accessed(at(st0.st_atime, st0.st_atime_nsec))
            .set_modified(at(st0.st_mtime, st0.st_mtime_nsec));
        dst.set_times(times)
            .map_err(|e| format!("setting times: {e}"))?;
        dst.sync_all()
            .map_err(|e| format!("fsync of the new copy: {e}"))?;
        drop(dst);
        // Unchanged and not open in the mount, just before the rename.
        let now = sys::fstat(data.as_raw_fd()).map_err(|e| e.to_string())?;
        let named =
            std::fs::symlink_metadata(mountpoint.join(rel.trim_start_matches('/')).join(name));
        if !unchanged(&st0, &now) || ino_at(dir, &c) != Some(st0.st_ino) || named.is_err() {
            return Ok(Outcome::Changed);
        }
        if !try_lock(data.as_raw_fd(), libc::LOCK_EX).map_err(|e| e.to_string())? {
            return Ok(Outcome::Busy);
        }
        std::fs::rename(&tmp, &target)
            .map_err(|e| format!("renaming the new copy over it: {e}"))?;
        let _ = named.map(|m| m.ino());
        let header = sidecar::read_at(dir, &entry.name).map_err(|e| e.to_string())?;
        Ok(Outcome::Done {
            new: Box::new(header),
        })
    })();
    if !matches!(result, Ok(Outcome::Done { .. })) {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes, through the mount, new copies a killed rekey left in `rel`.
fn remove_mount_temps(listing: &Listing, rel: &str, mountpoint: &Path, tally: &Tally) {
    for name in listing.files.iter().filter(|n| is_mount_temp(n.as_bytes())) {
        let path = mountpoint.join(rel.trim_start_matches('/')).join(name);
        if std::fs::remove_file(path).is_ok() {
            tally.with(|s| s.temps_removed += 1);
        }
    }
}

/// Rekeys the files of `scope` (see the module documentation).
pub fn rekey(
    scope: &Scope, opts: &RekeyOptions, progress: &dyn Progress,
) -> Result<Summary, LifecycleError> {
    let _lock = lock(&scope.volume.backing)?;
    let keys = scope.file_keys();
    let tally = Tally::new(Summary::new("rekey", &scope.dir, opts.dry_run));
    progress.start(scope.count_files()?);

    struct Item {
        entry: Entry,
        header: FileHeader,
        policy: usize,
        rel: String,
    }
    let work = |batch: Vec<Item>| {
        let files: Vec<crate::fs::file_keys::LifecycleFile> = batch
            .iter()
            .map(|it| {
                (
                    &it.header,
                    &scope.volume.policies[it.policy],
                    it.entry.path.as_str(),
                )
            })
            .collect();
        // Through a mount, the mount makes the new keys (as for any new
        // file); only the old ones are needed here, to check the file.
        let results = match &scope.mountpoint {
            None => scope.rt.block_on(keys.rekey(&files)),
            Some(_) => Vec::new(),
        };
        let mut results = results.into_iter();
        for it in &batch {
            let old_id = it.header.parsed.header.file_id;
            let outcome = match &scope.mountpoint {
                Some(m) => rekey_through_mount(&it.entry, &it.rel, m),
                None => results
                    .next()
                    .expect("one answer per file")
                    .map_err(|e| e.to_string())
                    .and_then(|(old, new)| rekey_one(&it.entry, &it.header, old, new)),
            };
            match outcome {
                Ok(Outcome::Done { new }) => {
                    let h = &new.parsed.header;
                    let detail = format!("new file ID (was {})", hex::encode(old_id));
                    scope.audit.record(
                        &AuditEvent::new(AuditOp::Rekey, AuditOutcome::Ok)
                            .key(&h.primary().key_ref)
                            .file(h.file_id)
                            .path(&it.entry.path)
                            .detail(&detail),
                    );
                    tally.with(|s| s.changed += 1);
                }
                Ok(Outcome::Busy) => tally.with(|s| s.busy += 1),
                Ok(Outcome::Changed) => tally.with(|s| s.changed_meanwhile += 1),
                Err(e) => {
                    scope.audit.record(
                        &AuditEvent::new(AuditOp::Rekey, AuditOutcome::Failed(&e))
                            .file(old_id)
                            .path(&it.entry.path),
                    );
                    tally.with(|s| s.fail(progress, &it.entry.path, e));
                }
            }
            progress.advance(1);
        }
    };

    let walked = run_batches(
        opts.concurrency,
        |send| {
            let mut batch: Vec<Item> = Vec::new();
            // Re-encryption, not the KMS, is the cost here: small batches
            // keep every thread busy; still far fewer KMS calls than files.
            let batch_len = BATCH.min(16);
            let walked = scope.walk(|dir, rel, listing| {
                if !opts.dry_run {
                    settle_temps(dir, listing, &tally);
                    if let Some(m) = &scope.mountpoint {
                        remove_mount_temps(listing, rel, m, &tally);
                    }
                }
                let shared = match dir.try_clone_to_owned() {
                    Ok(fd) => std::sync::Arc::new(fd),
                    Err(e) => {
                        tally.with(|s| s.fail(progress, rel, format!("cannot open: {e}")));
                        return;
                    }
                };
                for name in &listing.files {
                    if is_mount_temp(name.as_bytes()) {
                        continue;
                    }
                    let path = file_path(rel, name);
                    tally.with(|s| s.files += 1);
                    let header = match sidecar::read_at(dir.as_raw_fd(), name) {
                        Ok(h) => h,
                        Err(SidecarError::Missing) => {
                            tally.with(|s| s.plaintext += 1);
                            progress.advance(1);
                            continue;
                        }
                        Err(e) => {
                            tally.with(|s| s.fail(progress, &path, e.to_string()));
                            progress.advance(1);
                            continue;
                        }
                    };
                    if opts.dry_run {
                        tally.with(|s| s.changed += 1);
                        progress.advance(1);
                        continue;
                    }
                    batch.push(Item {
                        entry: Entry {
                            dir: shared.clone(),
                            name: name.clone(),
                            path: path.clone(),
                        },
                        header,
                        policy: scope.policy_index(&path),
                        rel: rel.to_owned(),
                    });
                    if batch.len() == batch_len {
                        tally.with(|s| s.kms_batches += 1);
                        send(std::mem::take(&mut batch));
                    }
                }
            });
            if !batch.is_empty() {
                tally.with(|s| s.kms_batches += 1);
                send(batch);
            }
            walked
        },
        work,
    );
    walked?;
    progress.finish();
    Ok(tally.finish())
}
