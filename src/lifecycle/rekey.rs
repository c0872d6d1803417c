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
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{
    file_path, key_files, lock, run_batches, Entry, Item, LifecycleError, Progress, Scope, Summary,
    Tally, BATCH,
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
const INTENT_MAGIC: &str = "kmsfs rekey intent 2";

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
        // Shared mounts mark their opens with a byte-range lock instead.
        if how == libc::LOCK_EX && !crate::fs::shared::try_mark_swap(fd).unwrap_or(true) {
            unlock(fd);
            return Ok(false);
        }
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
    crate::fs::shared::unmark_swap(fd);
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

/// Why a hard-linked file is not rekeyed.
const HARD_LINKED: &str = "has several hard links; rekey makes a new file, which would split \
     them: left as it is";

/// Opens data file `name` in `dir` for locking (read-write where allowed:
/// on NFS, flock is a byte-range lock, and an exclusive one needs a
/// writable descriptor), not following a symlink. `None` when it is gone.
fn open_for_lock(dir: RawFd, name: &CString) -> Result<Option<File>, String> {
    // A handle that opens nothing first: only a regular file is opened.
    let handle = match sys::open_path(dir, name) {
        Ok(h) => h,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => return Ok(None),
        Err(e) => return Err(format!("cannot open its data: {e}")),
    };
    let st = sys::fstat(handle.as_raw_fd()).map_err(|e| e.to_string())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    let opened = match sys::reopen(handle.as_raw_fd(), libc::O_RDWR) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            sys::reopen(handle.as_raw_fd(), libc::O_RDONLY)
        }
        other => other,
    };
    opened
        .map(|fd| Some(File::from(fd)))
        .map_err(|e| format!("cannot open its data: {e}"))
}

/// The access and modification times of `st`, for `futimens`.
fn times_of(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
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

/// Whether `name` is a plain file name of this directory the walk listed:
/// one component, not reserved. An intent record (untrusted, like all of
/// the backing directory) can name nothing else.
fn listed_name(name: &[u8], listing: &Listing) -> bool {
    !name.is_empty()
        && !name.contains(&b'/')
        && !name.contains(&0)
        && name != b"."
        && name != b".."
        && !crate::format::names::is_reserved(name)
        && listing.files.iter().any(|f| f.as_bytes() == name)
}

/// The inode number of regular file `name` in `dir`, not following a
/// symlink.
fn regular_ino(dir: RawFd, name: &CString) -> Option<u64> {
    sys::fstatat(dir, name)
        .ok()
        .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        .map(|st| st.st_ino)
}

/// Finishes or undoes the rekey swaps a killed pass left in `dir` (see the
/// module documentation), then removes the leftover temporary files of
/// every swap whose file is consistent again. Needs no KMS: the intent
/// record says which header is the new one (its SHA-256) and which inode
/// the new data is.
/// Returns the names of the files left half swapped: passes leave them
/// alone.
pub(super) fn settle_temps(dir: BorrowedFd<'_>, listing: &Listing, tally: &Tally) -> Vec<Vec<u8>> {
    let fd = dir.as_raw_fd();
    let mut keep: Vec<&OsString> = Vec::new();
    let mut unsettled = Vec::new();
    for t in listing
        .temps
        .iter()
        .filter(|t| t.as_bytes().ends_with(b".intent"))
    {
        let Some(intent) = read_intent(fd, t) else {
            continue;
        };
        let name = &intent.name;
        let shown = crate::fs::escape_name(name);
        let (Ok(c), true) = (cstr_of(name), listed_name(name, listing)) else {
            // The file is gone or renamed: nothing left to pair.
            continue;
        };
        let temps = TempNames::of(name);
        let header_swapped = sidecar::read_raw_at(fd, OsStr::from_bytes(name))
            .is_ok_and(|raw| Sha256::digest(&raw)[..] == intent.header_sha256[..]);
        let data_swapped = regular_ino(fd, &c) == Some(intent.data_ino);
        let data_waiting = regular_ino(fd, &temps.data) == Some(intent.data_ino);
        let consistent = match (header_swapped, data_swapped) {
            (true, true) | (false, false) => true,
            // Killed between the two exchanges: the data follows.
            (true, false) if data_waiting => exchange(fd, &temps.data, &c).is_ok(),
            // Not this pass's order; the new header never went in.
            (false, true) if regular_ino(fd, &temps.data).is_some() => {
                exchange(fd, &temps.data, &c).is_ok()
            }
            _ => false,
        };
        if consistent {
            if header_swapped != data_swapped {
                tracing::warn!("{shown}: finished the swap of a rekey that was interrupted");
            }
        } else {
            tracing::warn!(
                "{shown}: an interrupted rekey's swap could not be finished; its temporary files \
                 are kept for the next run (or for repair by hand)"
            );
            for n in [&temps.data, &temps.header, &temps.intent] {
                if let Some(k) = listing.temps.iter().find(|k| k.as_bytes() == n.as_bytes()) {
                    keep.push(k);
                }
            }
            unsettled.push(name.clone());
        }
        let _ = sys::fsync(fd);
    }
    for t in listing.temps.iter().filter(|t| !keep.contains(t)) {
        if let Ok(c) = sys::cstr(t) {
            if sys::unlinkat(fd, &c, 0).is_ok() {
                tally.with(|s| s.temps_removed += 1);
            }
        }
    }
    let _ = sys::fsync(fd);
    unsettled
}

/// The failure of a file an interrupted rekey left half swapped.
pub(super) const UNSETTLED: &str = "an interrupted rekey left this file half swapped and its \
     temporary files could not be settled (see the log); left alone";

/// What an intent record says.
struct Intent {
    name: Vec<u8>,
    data_ino: u64,
    header_sha256: Vec<u8>,
}

/// The intent record `intent` in `dir`, if it is one, under the name its
/// own content implies.
fn read_intent(dir: RawFd, intent: &OsString) -> Option<Intent> {
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
    let data_ino = lines.next()?.strip_prefix("data_ino=")?.parse().ok()?;
    let header_sha256 = hex::decode(lines.next()?.strip_prefix("header_sha256=")?).ok()?;
    (TempNames::of(&name).intent.as_bytes() == intent.as_bytes()).then_some(Intent {
        name,
        data_ino,
        header_sha256,
    })
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
    let Some(data) = open_for_lock(dir, &c)? else {
        return Ok(Outcome::Changed);
    };
    let st0 = sys::fstat(data.as_raw_fd()).map_err(|e| e.to_string())?;
    if st0.st_nlink != 1 {
        return Err(HARD_LINKED.into());
    }
    if !not_open(data.as_raw_fd())? {
        return Ok(Outcome::Busy);
    }

    let temps = TempNames::of(name);
    if [&temps.data, &temps.header, &temps.intent]
        .iter()
        .any(|t| sys::fstatat(dir, t).is_ok())
    {
        return Err(UNSETTLED.into());
    }
    let keep = std::cell::Cell::new(false);
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
        sys::futimens(nfd, &times_of(&st0)).map_err(io("setting times on the new copy"))?;
        new_file.sync_all().map_err(io("fsync of the new copy"))?;
        let header_file = write_temp(dir, &temps.header, &new.header.raw)
            .map_err(io("writing the new header"))?;
        // The new header belongs to whoever owned the old one (the mount's
        // user), with its mode.
        let old_sc = sys::fstatat(dir, &sc).map_err(io("the old header"))?;
        let hfd = header_file.as_raw_fd();
        sys::fchownat(hfd, old_sc.st_uid, old_sc.st_gid).map_err(io("chown of the new header"))?;
        sys::fchmod(hfd, old_sc.st_mode & 0o7777).map_err(io("chmod of the new header"))?;
        let data_ino = sys::fstat(nfd).map_err(|e| e.to_string())?.st_ino;
        drop(header_file);
        let intent = format!(
            "{INTENT_MAGIC}\nname={}\ndata_ino={data_ino}\nheader_sha256={}\n",
            hex::encode(name),
            hex::encode(Sha256::digest(&new.header.raw))
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
            if let Err(e) = exchange(dir, &temps.header, &sc) {
                keep.set(true);
                return Err(format!(
                    "exchanging the header back: {e}; the intent record is kept for the next run"
                ));
            }
            return Ok(Outcome::Changed);
        }
        if let Err(e) = exchange(dir, &temps.data, &c) {
            // Back to the old pair; failing that, the next pass finishes
            // the swap from the intent record.
            if exchange(dir, &temps.header, &sc).is_err() {
                keep.set(true);
            }
            return Err(format!("exchanging the data: {e}"));
        }
        // Locks go with the descriptors: before the old copies are removed.
        unlock(nfd);
        unlock(data.as_raw_fd());
        Ok(Outcome::Done {
            new: Box::new(new.header),
        })
    })();
    // Old data and header (after a swap) or the unused new copies; kept
    // when the file is left half swapped, for `settle_temps`.
    if !keep.get() {
        temps.remove(dir);
    }
    let _ = sys::fsync(dir);
    result
}

/// The mount's directory for volume directory `rel`, opened one component
/// at a time without following symlinks (a symlink planted in the backing
/// directory shows in the mount too), and checked to be the backing
/// directory `backing_dir` (the mount reports backing inode numbers).
fn mount_dir(
    mountpoint: &Path, rel: &str, backing_dir: RawFd,
) -> Result<std::os::fd::OwnedFd, String> {
    if rel.contains('\u{FFFD}') {
        return Err("its directory's name is not UTF-8; rekey it with the volume unmounted".into());
    }
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let root = sys::cstr(mountpoint.as_os_str()).map_err(|e| e.to_string())?;
    let mut dir = sys::openat(libc::AT_FDCWD, &root, flags & !libc::O_NOFOLLOW, 0)
        .map_err(|e| format!("cannot open the mount {}: {e}", mountpoint.display()))?;
    for component in rel.split('/').filter(|c| !c.is_empty()) {
        let c = cstr_of(component.as_bytes()).map_err(|e| e.to_string())?;
        dir = sys::openat(dir.as_raw_fd(), &c, flags, 0)
            .map_err(|e| format!("its directory is no longer reachable in the mount: {e}"))?;
    }
    if rel != "/" {
        let in_mount = sys::fstat(dir.as_raw_fd()).map_err(|e| e.to_string())?;
        let backing = sys::fstat(backing_dir).map_err(|e| e.to_string())?;
        if in_mount.st_ino != backing.st_ino {
            return Err(
                "its directory in the mount is not the one in the backing directory \
                        (moved meanwhile)"
                    .into(),
            );
        }
    }
    Ok(dir)
}

/// Takes and drops an exclusive lock on `fd`: whether no mount has the
/// file open. A close through the mount is released asynchronously, so a
/// lock held a moment ago is given a few tries.
fn not_open(fd: RawFd) -> Result<bool, String> {
    for attempt in 0..5 {
        if try_lock(fd, libc::LOCK_EX).map_err(|e| e.to_string())? {
            unlock(fd);
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(10 << attempt));
    }
    Ok(false)
}

/// Rekeys one file through the mount at `mountpoint` (see the module
/// documentation). `rel` is the file's directory inside the volume.
fn rekey_through_mount(entry: &Entry, rel: &str, mountpoint: &Path) -> Result<Outcome, String> {
    let dir = entry.dir.as_raw_fd();
    let c = cstr_of(entry.name.as_bytes()).map_err(|e| e.to_string())?;
    let data = match open_for_lock(dir, &c)? {
        Some(f) => f,
        None => return Ok(Outcome::Changed),
    };
    let st0 = sys::fstat(data.as_raw_fd()).map_err(|e| e.to_string())?;
    if st0.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(Outcome::Changed);
    }
    if st0.st_nlink != 1 {
        return Err(HARD_LINKED.into());
    }
    if !not_open(data.as_raw_fd())? {
        return Ok(Outcome::Busy);
    }
    let mdir = mount_dir(mountpoint, rel, dir)?;
    let md = mdir.as_raw_fd();
    let tmp = {
        use rand::RngCore;
        let mut tag = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut tag);
        cstr_of(format!(".{}{MOUNT_TEMP_SUFFIX}", hex::encode(tag)).as_bytes())
            .map_err(|e| e.to_string())?
    };
    let result = (|| -> Result<Outcome, String> {
        let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
        let mut src = File::from(
            sys::openat(
                md,
                &c,
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOCTTY,
                0,
            )
            .map_err(io("reading it through the mount"))?,
        );
        let in_mount = sys::fstat(src.as_raw_fd()).map_err(|e| e.to_string())?;
        if in_mount.st_mode & libc::S_IFMT != libc::S_IFREG || in_mount.st_ino != st0.st_ino {
            return Ok(Outcome::Changed);
        }
        let mut dst = File::from(
            sys::openat(
                md,
                &tmp,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NOCTTY,
                0o600,
            )
            .map_err(io("creating its new copy in the mount"))?,
        );
        std::io::copy(&mut src, &mut dst).map_err(io("copying it"))?;
        // The extended attributes the mount shows (it keeps its own).
        copy_xattrs(&src, &dst).map_err(io("copying extended attributes"))?;
        drop(src);
        let dfd = dst.as_raw_fd();
        sys::fchownat(dfd, st0.st_uid, st0.st_gid).map_err(io("chown of the new copy"))?;
        sys::fchmod(dfd, st0.st_mode & 0o7777).map_err(io("chmod of the new copy"))?;
        sys::futimens(dfd, &times_of(&st0)).map_err(io("setting times on the new copy"))?;
        dst.sync_all().map_err(io("fsync of the new copy"))?;
        drop(dst);
        // Unchanged and not open in the mount just before the rename (no
        // lock is held across it: the mount's own threads serve it).
        let now = sys::fstat(data.as_raw_fd()).map_err(|e| e.to_string())?;
        if !unchanged(&st0, &now) || ino_at(dir, &c) != Some(st0.st_ino) {
            return Ok(Outcome::Changed);
        }
        if !not_open(data.as_raw_fd())? {
            return Ok(Outcome::Busy);
        }
        sys::renameat2(md, &tmp, md, &c, 0).map_err(io("renaming the new copy over it"))?;
        let header = sidecar::read_at(dir, &entry.name).map_err(|e| e.to_string())?;
        Ok(Outcome::Done {
            new: Box::new(header),
        })
    })();
    if !matches!(result, Ok(Outcome::Done { .. })) {
        let _ = sys::unlinkat(md, &tmp, 0);
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

    let work = |batch: Vec<Item>| {
        let files = key_files(scope, &batch);
        // Through a mount, the mount makes the new keys (as for any new
        // file); only the old ones are needed here, to check the file.
        let results = match &scope.mountpoint {
            None => scope.rt.block_on(keys.rekey(&files)),
            Some(_) => Vec::new(),
        };
        let mut results = results.into_iter();
        for it in &batch {
            let old_id = it.header.parsed.header.file_id;
            let mut retry = false;
            let outcome = match &scope.mountpoint {
                Some(m) => rekey_through_mount(&it.entry, &it.entry.rel, m),
                None => results
                    .next()
                    .expect("one answer per file")
                    .map_err(|e| {
                        retry = e.is_retryable();
                        e.to_string()
                    })
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
                    tally.with(|s| {
                        s.retryable += u64::from(retry);
                        s.fail(progress, &it.entry.path, e)
                    });
                }
            }
            progress.advance(1);
        }
    };

    let (walked, panicked) = run_batches(
        opts.concurrency,
        |send| {
            let mut batch: Vec<Item> = Vec::new();
            // As many files per batch as rewrap: one KMS request per 120
            // files on Vault; `--concurrency` batches are re-encrypted at
            // once.
            let batch_len = BATCH;
            let walked = scope.walk(|dir, rel, listing| {
                let mut unsettled = Vec::new();
                if !opts.dry_run {
                    unsettled = settle_temps(dir, listing, &tally);
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
                    if unsettled.iter().any(|u| u.as_slice() == name.as_bytes()) {
                        tally.with(|s| s.fail(progress, &path, UNSETTLED.into()));
                        progress.advance(1);
                        continue;
                    }
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
                            rel: rel.to_owned(),
                        },
                        header,
                        policy: scope.policy_index(&path),
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
    tally.with(|s| s.failed += panicked);
    progress.finish();
    Ok(tally.finish())
}
