//! Opening files where someone else may have planted something at the name
//! (a backing directory, a keyring's directory): never through a symlink,
//! never blocking on a FIFO, never acquiring a controlling terminal, and
//! checked to be a regular file on the open descriptor.

use std::fs::{File, OpenOptions};
use std::io;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The flags of every open here: ELOOP instead of following a symlink at
/// the name; a FIFO or device cannot block or become a terminal.
pub const NO_FOLLOW_FLAGS: i32 =
    libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// Opens `path` for reading, or None if there is none. The caller checks
/// the file type on the descriptor (its error says what to do).
pub fn open_no_follow(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(NO_FOLLOW_FLAGS)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// An exclusive `flock` on `PATH.lock` (created 0600 if missing), held
/// until the returned file drops. Anything but a regular file at that name
/// is refused, so a planted FIFO cannot hang the caller and a device node
/// is never written.
pub fn lock_beside(path: &Path) -> io::Result<File> {
    let file = open_lock_file(path)?;
    flock_retrying(&file, libc::LOCK_EX)?;
    Ok(file)
}

/// As [`lock_beside`] without waiting, shared or exclusive: `None` when
/// someone else holds the lock in a way that excludes this one.
pub fn try_lock_beside(path: &Path, shared: bool) -> io::Result<Option<File>> {
    let file = open_lock_file(path)?;
    let how = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    match flock_retrying(&file, how | libc::LOCK_NB) {
        Ok(()) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `PATH.lock`, opened (created 0600 if missing) and checked to be a
/// regular file.
fn open_lock_file(path: &Path) -> io::Result<File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock = PathBuf::from(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(NO_FOLLOW_FLAGS)
        .open(&lock)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file; remove it", lock.display()),
        ));
    }
    Ok(file)
}

fn flock_retrying(file: &File, how: i32) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Replaces `path` with `bytes`: a temporary file beside it, created
/// exclusively without following symlinks (a name planted there cannot
/// redirect the write), fsynced, then renamed over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use rand::RngCore;
    let dir = parent_of(path);
    let base = path.file_name().unwrap_or_default().to_string_lossy();
    let mut tag = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut tag);
    // A leading dot hides it; in a backing directory ".kmsfs..." keeps it
    // reserved, invisible in the mount.
    let dot = if base.starts_with('.') { "" } else { "." };
    let tmp = dir.join(format!("{dot}{base}.tmp-{}", hex::encode(tag)));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(NO_FOLLOW_FLAGS)
        .open(&tmp)?;
    let written = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable once the directory is.
    File::open(dir).and_then(|d| d.sync_all())
}

/// The directory `path` is in ("." for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}
