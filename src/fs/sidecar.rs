//! Sidecar I/O: reading, writing and removing the header file that sits
//! beside each encrypted file (`format::names` says what it is called). The
//! mount, `kmsfs info`, `kmsfs policy status` and repair tools all read
//! headers through here, so a sidecar is opened and checked one way only.
//!
//! The backing directory is untrusted: a sidecar name may hold a symlink, a
//! FIFO, a device or a huge file. Sidecars are opened without following
//! symlinks, without blocking (a FIFO must not hang the opener), without
//! becoming a controlling terminal, must be regular files, and are read up
//! to `MAX_SIDECAR_LEN` bytes only.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::error::{FsError, FsResult};
use super::sys;
use crate::failpoint;
use crate::format::header::{self as hdr, ParsedHeader};
use crate::format::names::{sidecar_name, successor_name};
use crate::format::FormatError;

/// Sidecars are small; anything larger is not one of ours.
pub const MAX_SIDECAR_LEN: u64 = 64 * 1024;

const READ_FLAGS: i32 = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;

/// A sidecar's bytes and their parse (not yet authenticated).
pub struct FileHeader {
    pub parsed: ParsedHeader,
    pub raw: Vec<u8>,
}

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("sidecar is missing (not a kmsfs file, or its sidecar was deleted)")]
    Missing,
    #[error("sidecar is not a regular file")]
    NotRegular,
    #[error("sidecar is larger than {MAX_SIDECAR_LEN} bytes, so not a kmsfs header")]
    TooLarge,
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("sidecar could not be read: {0}")]
    Io(std::io::Error),
}

impl SidecarError {
    /// As a filesystem error about file `label`. I/O errors keep their errno
    /// (EACCES stays EACCES); a sidecar that is missing, of the wrong type or
    /// unparsable makes the file unreadable (EIO with a log line).
    pub fn for_file(self, label: &str) -> FsError {
        match self {
            SidecarError::Io(e) => FsError::Io(e),
            other => FsError::header(label, other),
        }
    }
}

fn sidecar_cstr(name: &OsStr) -> std::io::Result<std::ffi::CString> {
    sys::cstr(OsStr::from_bytes(&sidecar_name(name.as_bytes())))
}

/// Opens the sidecar of `name` in directory `dir` for reading, checked to be
/// a regular file.
fn open_checked(dir: RawFd, name: &OsStr) -> Result<File, SidecarError> {
    open_exact(dir, &sidecar_cstr(name).map_err(SidecarError::Io)?)
}

/// Opens file `sc` in `dir` as a sidecar is opened (see the module
/// documentation).
fn open_exact(dir: RawFd, sc: &std::ffi::CStr) -> Result<File, SidecarError> {
    let fd = match sys::openat(dir, sc, READ_FLAGS, 0) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(SidecarError::Missing),
        // A symlink planted under a sidecar's name.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(SidecarError::NotRegular),
        Err(e) => return Err(SidecarError::Io(e)),
    };
    let st = sys::fstat(fd.as_raw_fd()).map_err(SidecarError::Io)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(SidecarError::NotRegular);
    }
    Ok(File::from(fd))
}

/// The raw bytes of the sidecar of `name` in directory `dir`.
pub fn read_raw_at(dir: RawFd, name: &OsStr) -> Result<Vec<u8>, SidecarError> {
    read_exact_at(dir, &sidecar_cstr(name).map_err(SidecarError::Io)?)
}

/// The raw bytes of header file `sc` in `dir` (a sidecar or a temporary one).
pub fn read_exact_at(dir: RawFd, sc: &std::ffi::CStr) -> Result<Vec<u8>, SidecarError> {
    read_bounded_at(dir, sc, MAX_SIDECAR_LEN)
}

/// The bytes of small kmsfs file `sc` in `dir`, opened as a sidecar is and
/// refused (`TooLarge`) beyond `max` bytes.
pub fn read_bounded_at(dir: RawFd, sc: &std::ffi::CStr, max: u64) -> Result<Vec<u8>, SidecarError> {
    let f = open_exact(dir, sc)?;
    // Headers are a few hundred bytes: one read usually gets it all.
    let mut raw = Vec::with_capacity(1024);
    f.take(max + 1)
        .read_to_end(&mut raw)
        .map_err(SidecarError::Io)?;
    if raw.len() as u64 > max {
        return Err(SidecarError::TooLarge);
    }
    Ok(raw)
}

/// The parsed header of `name` in directory `dir`.
pub fn read_at(dir: RawFd, name: &OsStr) -> Result<FileHeader, SidecarError> {
    let raw = read_raw_at(dir, name)?;
    let parsed = hdr::parse(&raw)?;
    Ok(FileHeader { parsed, raw })
}

/// The parsed header of the file at `path` (its sidecar sits beside it),
/// for tools working on a backing directory by path.
pub fn read_beside(path: &Path) -> Result<FileHeader, SidecarError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or(SidecarError::Io(std::io::Error::from_raw_os_error(
            libc::EINVAL,
        )))?;
    let dir = sys::cstr(parent.as_os_str()).map_err(SidecarError::Io)?;
    let dir = sys::openat(libc::AT_FDCWD, &dir, libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(SidecarError::Io)?;
    read_at(dir.as_raw_fd(), name)
}

/// Starts reading the sidecars of `names` in `dir` into the page cache,
/// without waiting (a hint; failures are ignored).
pub fn read_ahead_at(dir: RawFd, names: &[std::ffi::OsString]) {
    for name in names {
        if let Ok(f) = open_checked(dir, name) {
            sys::readahead(f.as_raw_fd(), MAX_SIDECAR_LEN as usize);
        }
    }
}

/// Writes a new sidecar holding `raw` for `name` in `dir` (O_EXCL, mode
/// 0600). Returns the open sidecar, for a later fsync. A sidecar already
/// there whose data file is gone is left over from a crash between an
/// unlink's two steps, and is replaced.
///
/// `shared` (other mounts may create the same name at the same time): such
/// a sidecar may also be another mount's create that has not made its data
/// file yet. So the new sidecar is returned under an exclusive flock that
/// says "a create of `name` is in flight" until the caller releases it
/// ([`release_claim`], or closing it) once the data file exists, and its
/// bytes are made durable first (a client of NFS or GlusterFS may keep
/// them until then, and another node must never find it empty). Only an
/// existing sidecar nobody holds is taken for a leftover; a held one makes
/// this create fail with EEXIST, as the other create wins the name.
/// Without this, two mounts creating one name at once could each remove
/// the other's sidecar, and leave a file without its header. A lone mount
/// needs none of it: the kernel serializes creates and unlinks of a
/// directory's names.
pub fn create_at(dir: RawFd, name: &OsStr, raw: &[u8], shared: bool) -> FsResult<File> {
    let sc = sidecar_cstr(name)?;
    let c = sys::cstr(name)?;
    for _ in 0..4 {
        match sys::openat(
            dir,
            &sc,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NOCTTY,
            0o600,
        ) {
            Ok(fd) => {
                let mut f = File::from(fd);
                // Another create may have taken it for a leftover in the
                // instant before this lock, and removed it: then start over.
                if shared && (!hold(&f, false)? || !still_named(dir, &sc, &f)?) {
                    continue;
                }
                let written = f.write_all(raw).and_then(|()| match shared {
                    true => f.sync_data(),
                    false => Ok(()),
                });
                if let Err(e) = written {
                    let _ = remove_own(dir, name, &f);
                    return Err(e.into());
                }
                return Ok(f);
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if sys::fstatat(dir, &c).is_ok() {
                    return Err(FsError::errno(libc::EEXIST));
                }
                let old = match open_exact(dir, &sc) {
                    Ok(f) => f,
                    // Gone meanwhile: try again.
                    Err(SidecarError::Missing) => continue,
                    // A FIFO, device or directory planted under the name
                    // is not ours to remove (nor to open for I/O).
                    Err(_) => return Err(FsError::errno(libc::EEXIST)),
                };
                // Held: a create (or unlink) of the name is in flight.
                if shared && !hold(&old, true)? {
                    return Err(FsError::errno(libc::EEXIST));
                }
                if sys::fstatat(dir, &c).is_ok() {
                    return Err(FsError::errno(libc::EEXIST));
                }
                remove_own(dir, name, &old)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(FsError::errno(libc::EEXIST))
}

/// An exclusive flock on sidecar `f`; `try_only`: false if another holds
/// it. A backing filesystem without flock grants every lock
/// (`sys::flock_or_granted`).
fn hold(f: &File, try_only: bool) -> FsResult<bool> {
    let how = libc::LOCK_EX | if try_only { libc::LOCK_NB } else { 0 };
    Ok(sys::flock_or_granted(f.as_raw_fd(), how)?)
}

/// Whether sidecar name `sc` in `dir` still leads to open file `f`.
fn still_named(dir: RawFd, sc: &CStr, f: &File) -> FsResult<bool> {
    let open = sys::fstat(f.as_raw_fd())?;
    Ok(
        matches!(sys::fstatat(dir, sc), Ok(st) if (st.st_dev, st.st_ino) == (open.st_dev, open.st_ino)),
    )
}

/// Removes the sidecar of `name` in `dir` only if it is still `f` (another
/// mount may have put its own there since `f` was opened).
pub fn remove_own(dir: RawFd, name: &OsStr, f: &File) -> FsResult<()> {
    let sc = sidecar_cstr(name)?;
    if still_named(dir, &sc, f)? {
        match sys::unlinkat(dir, &sc, 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// Ends the "create in flight" claim of a sidecar made by [`create_at`].
pub fn release_claim(sidecar: &File) {
    let _ = sys::flock(sidecar.as_raw_fd(), libc::LOCK_UN);
}

/// Whether a create of `name` in `dir` is in flight on some mount (its
/// sidecar is held, see [`create_at`]).
pub fn create_in_flight(dir: RawFd, name: &OsStr) -> FsResult<bool> {
    match open_exact(dir, &sidecar_cstr(name)?) {
        Ok(f) => Ok(!hold(&f, true)?),
        Err(_) => Ok(false),
    }
}

/// Waits for any create of `name` in `dir` in flight (see [`create_at`])
/// and keeps others from taking its sidecar for a leftover: held by an
/// unlink of a shared mount from before it removes the data until the
/// sidecar is gone. None when there is no sidecar (or something other than
/// a regular file is in its place, which is not waited on).
pub fn hold_for_removal(dir: RawFd, name: &OsStr) -> FsResult<Option<File>> {
    let Ok(f) = open_exact(dir, &sidecar_cstr(name)?) else {
        return Ok(None);
    };
    hold(&f, false)?;
    Ok(Some(f))
}

/// Removes the sidecar of `name` in `dir` if there is one. Returns an O_PATH
/// handle on the removed sidecar when one was taken, so the caller can have
/// its space freed off the request path (closing the last reference is when
/// the backing filesystem frees it).
pub fn remove_at(dir: RawFd, name: &OsStr) -> FsResult<Option<OwnedFd>> {
    let sc = sidecar_cstr(name)?;
    let held = sys::open_path(dir, &sc).ok();
    match sys::unlinkat(dir, &sc, 0) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e.into()),
        _ => Ok(held),
    }
}

/// What [`replace_at`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Replaced {
    /// The new header is in place.
    Done,
    /// The sidecar no longer held the expected bytes (the file was
    /// replaced or renamed meanwhile): left as it was.
    Changed,
    /// There was no sidecar any more (the file was removed meanwhile).
    Gone,
}

/// A temporary file of `rewrap`/`rekey` in `dir`: a fresh random name,
/// created O_EXCL with mode 0600. Returns its name and the open file.
pub fn create_temp_at(dir: RawFd) -> FsResult<(std::ffi::CString, File)> {
    use rand::RngCore;
    let mut tag = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut tag);
    let mut name = crate::format::names::LIFECYCLE_TEMP_PREFIX.to_vec();
    name.extend_from_slice(hex::encode(tag).as_bytes());
    let c = sys::cstr(OsStr::from_bytes(&name))?;
    let fd = sys::openat(
        dir,
        &c,
        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NOCTTY,
        0o600,
    )?;
    Ok((c, File::from(fd)))
}

/// Replaces the sidecar of `name` in `dir` by `raw` in one atomic step, if
/// it still holds `expected`: the new header is written to a temporary
/// file and made durable, then exchanged with the sidecar
/// (`RENAME_EXCHANGE`), so a reader sees the old header or the new one,
/// never neither. If what came out is not `expected` (the file changed
/// meanwhile), it is exchanged back. The caller makes the directory durable.
pub fn replace_at(dir: RawFd, name: &OsStr, expected: &[u8], raw: &[u8]) -> FsResult<Replaced> {
    let sc = sidecar_cstr(name)?;
    // The new header gets the old one's owner and mode (the mount's user
    // must still read it, whoever runs the rewrap).
    let old = match sys::fstatat(dir, &sc) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Replaced::Gone),
        Err(e) => return Err(e.into()),
    };
    let (tmp, mut f) = create_temp_at(dir)?;
    let written = f
        .write_all(raw)
        .and_then(|_| sys::fchownat(f.as_raw_fd(), old.st_uid, old.st_gid))
        .and_then(|_| sys::fchmod(f.as_raw_fd(), old.st_mode & 0o7777))
        .and_then(|_| f.sync_all())
        .map(|_| failpoint::synced());
    drop(f);
    let result = written.map_err(FsError::from).and_then(|_| {
        match sys::renameat2(dir, &tmp, dir, &sc, libc::RENAME_EXCHANGE) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Replaced::Gone),
            Err(e) => return Err(e.into()),
            Ok(()) => {}
        }
        match read_exact_at(dir, &tmp) {
            Ok(old) if old == expected => Ok(Replaced::Done),
            _ => {
                sys::renameat2(dir, &tmp, dir, &sc, libc::RENAME_EXCHANGE)?;
                Ok(Replaced::Changed)
            }
        }
    });
    let _ = sys::unlinkat(dir, &tmp, 0);
    result
}

/// Moves the sidecar of `old` in `odir` to be that of `new` in `ndir`
/// (`renameat2` flags as given).
pub fn rename_at(odir: RawFd, old: &OsStr, ndir: RawFd, new: &OsStr, flags: u32) -> FsResult<()> {
    let (o, n) = (sidecar_cstr(old)?, sidecar_cstr(new)?);
    Ok(sys::renameat2(odir, &o, ndir, &n, flags)?)
}

fn successor_cstr(name: &OsStr) -> std::io::Result<std::ffi::CString> {
    sys::cstr(OsStr::from_bytes(&successor_name(name.as_bytes())))
}

/// What the successor sidecar of a name says its header is to become
/// (docs/ARCHITECTURE.md, "Crash safety").
pub enum Successor {
    /// This header (raw bytes, not yet parsed).
    Header(Vec<u8>),
    /// No header: the name is to hold a sidecar-less (plaintext) file.
    NoHeader,
}

/// What is to replace the sidecar of a name, staged before a rename.
pub enum Next<'a> {
    /// The sidecar of `name` in `dir`.
    SidecarOf(RawFd, &'a OsStr),
    /// No sidecar at all.
    Nothing,
}

/// Stages `next` as the successor sidecar of `name` in `dir`, replacing a
/// stale one. A header is hard-linked, not copied: one metadata operation,
/// which a journaling backing filesystem keeps in order with the rename
/// that follows. Where links are refused, the bytes are copied and synced.
pub fn stage_successor(dir: RawFd, name: &OsStr, next: &Next<'_>) -> FsResult<()> {
    let p = successor_cstr(name)?;
    remove_successor(dir, name)?;
    let create = |raw: &[u8]| -> FsResult<()> {
        let fd = sys::openat(
            dir,
            &p,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NOCTTY,
            0o600,
        )?;
        let mut f = File::from(fd);
        f.write_all(raw)?;
        if !raw.is_empty() {
            f.sync_all()?;
            failpoint::synced();
        }
        Ok(())
    };
    match next {
        Next::Nothing => create(&[]),
        Next::SidecarOf(from_dir, from) => {
            let sc = sidecar_cstr(from)?;
            match sys::linkat(*from_dir, &sc, dir, &p, 0) {
                Ok(()) => Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP)
                    ) =>
                {
                    let raw = read_raw_at(*from_dir, from).map_err(|e| e.for_file("sidecar"))?;
                    create(&raw)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Puts the staged successor of `name` in `dir` in place: a header becomes
/// the sidecar (one atomic rename over the old one); "no header" removes
/// the sidecar, then the marker.
pub fn promote_successor(dir: RawFd, name: &OsStr, next: &Next<'_>) -> FsResult<()> {
    match next {
        Next::SidecarOf(..) => Ok(sys::renameat2(
            dir,
            &successor_cstr(name)?,
            dir,
            &sidecar_cstr(name)?,
            0,
        )?),
        Next::Nothing => {
            remove_at(dir, name)?;
            remove_successor(dir, name)
        }
    }
}

/// Removes the successor sidecar of `name` in `dir`, if any.
pub fn remove_successor(dir: RawFd, name: &OsStr) -> FsResult<()> {
    match sys::unlinkat(dir, &successor_cstr(name)?, 0) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e.into()),
        _ => Ok(()),
    }
}

/// Whether `name` in `dir` has a successor sidecar (any file type; only
/// ENOENT means none).
pub fn successor_exists(dir: RawFd, name: &OsStr) -> FsResult<bool> {
    match sys::fstatat(dir, &successor_cstr(name)?) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The successor sidecar of `name` in `dir`, read as a sidecar is (checked
/// to be a small regular file), or None.
pub fn read_successor(dir: RawFd, name: &OsStr) -> Result<Option<Successor>, SidecarError> {
    match read_exact_at(dir, &successor_cstr(name).map_err(SidecarError::Io)?) {
        Ok(raw) if raw.is_empty() => Ok(Some(Successor::NoHeader)),
        Ok(raw) => Ok(Some(Successor::Header(raw))),
        Err(SidecarError::Missing) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir_fd(p: &Path) -> OwnedFd {
        let c = sys::cstr(p.as_os_str()).unwrap();
        sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap()
    }

    #[test]
    fn hostile_sidecars_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fd = dir_fd(d.path());
        let dir = fd.as_raw_fd();
        assert!(matches!(
            read_raw_at(dir, OsStr::new("none")),
            Err(SidecarError::Missing)
        ));
        // A FIFO must neither block nor be read.
        let fifo = sys::cstr(OsStr::new(".kmsfs.fifo")).unwrap();
        assert_eq!(
            unsafe { libc::mkfifo(fifo_path(d.path(), &fifo).as_ptr(), 0o600) },
            0
        );
        assert!(matches!(
            read_raw_at(dir, OsStr::new("fifo")),
            Err(SidecarError::NotRegular)
        ));
        // A symlink to a real file is not followed.
        std::fs::write(d.path().join("target"), b"x").unwrap();
        symlink(d.path().join("target"), d.path().join(".kmsfs.link")).unwrap();
        assert!(matches!(
            read_raw_at(dir, OsStr::new("link")),
            Err(SidecarError::NotRegular)
        ));
        // A directory is not a sidecar.
        std::fs::create_dir(d.path().join(".kmsfs.sub")).unwrap();
        assert!(read_raw_at(dir, OsStr::new("sub")).is_err());
        // Too large.
        std::fs::write(
            d.path().join(".kmsfs.big"),
            vec![0u8; MAX_SIDECAR_LEN as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            read_raw_at(dir, OsStr::new("big")),
            Err(SidecarError::TooLarge)
        ));
        std::fs::write(d.path().join(".kmsfs.ok"), b"abc").unwrap();
        assert_eq!(read_raw_at(dir, OsStr::new("ok")).unwrap(), b"abc");
    }

    fn fifo_path(dir: &Path, name: &std::ffi::CStr) -> std::ffi::CString {
        let mut p = dir.as_os_str().as_bytes().to_vec();
        p.push(b'/');
        p.extend_from_slice(name.to_bytes());
        std::ffi::CString::new(p).unwrap()
    }

    #[test]
    fn a_shared_create_in_flight_wins_its_name_and_planted_fifos_never_block() {
        let d = tempfile::tempdir().unwrap();
        let fd = dir_fd(d.path());
        let dir = fd.as_raw_fd();
        let is_eexist = |r: FsResult<File>| {
            matches!(
                r,
                Err(FsError::Errno(super::super::error::Errno(libc::EEXIST)))
            )
        };
        // Another mount's create, between its sidecar and its data file.
        let in_flight = create_at(dir, OsStr::new("f"), b"theirs", true).unwrap();
        assert!(create_in_flight(dir, OsStr::new("f")).unwrap());
        assert!(is_eexist(create_at(dir, OsStr::new("f"), b"ours", true)));
        assert_eq!(read_raw_at(dir, OsStr::new("f")).unwrap(), b"theirs");
        // Released (its data file made), or gone with its process: an
        // orphan again, which a later create replaces.
        release_claim(&in_flight);
        assert!(!create_in_flight(dir, OsStr::new("f")).unwrap());
        create_at(dir, OsStr::new("f"), b"ours", true).unwrap();
        assert_eq!(read_raw_at(dir, OsStr::new("f")).unwrap(), b"ours");
        // A FIFO planted under a sidecar name: refused, not opened and
        // waited on.
        let fifo = d.path().join(".kmsfs.p");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(is_eexist(create_at(dir, OsStr::new("p"), b"x", true)));
        assert!(hold_for_removal(dir, OsStr::new("p")).unwrap().is_none());
    }

    #[test]
    fn create_replaces_only_orphans() {
        let d = tempfile::tempdir().unwrap();
        let fd = dir_fd(d.path());
        let dir = fd.as_raw_fd();
        create_at(dir, OsStr::new("f"), b"one", false).unwrap();
        // An orphan (no data file): replaced.
        create_at(dir, OsStr::new("f"), b"two", false).unwrap();
        assert_eq!(read_raw_at(dir, OsStr::new("f")).unwrap(), b"two");
        // With a data file: EEXIST.
        std::fs::write(d.path().join("f"), b"").unwrap();
        let e = create_at(dir, OsStr::new("f"), b"three", false).unwrap_err();
        assert!(matches!(
            e,
            FsError::Errno(super::super::error::Errno(libc::EEXIST))
        ));
        assert!(remove_at(dir, OsStr::new("f")).unwrap().is_some());
        assert!(remove_at(dir, OsStr::new("f")).unwrap().is_none());
    }
}
