//! Thin safe wrappers over the *at() system calls the backing side uses.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// openat(2), never making a terminal planted in the backing directory the
/// daemon's controlling terminal.
pub fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_CLOEXEC | libc::O_NOCTTY;
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags, mode) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An O_PATH handle on `name` in `dir`, not following a final symlink.
pub fn open_path(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Reopens a handle (O_PATH or not) with real access flags; works after
/// unlink.
pub fn reopen(fd: RawFd, flags: i32) -> io::Result<OwnedFd> {
    let path = proc_path(&fd);
    openat(libc::AT_FDCWD, &path, flags & !libc::O_CREAT, 0)
}

/// Makes directory `dir`'s entries durable (fsync of a readable reopen of
/// its O_PATH handle), and marks the point for the power-loss model.
pub fn sync_dir(dir: RawFd) -> io::Result<()> {
    std::fs::File::from(reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?).sync_all()?;
    crate::failpoint::synced();
    Ok(())
}

/// `/proc/self/fd/FD`: a path that reaches what `fd` refers to.
pub fn fd_path(fd: RawFd) -> std::path::PathBuf {
    format!("/proc/self/fd/{fd}").into()
}

pub fn proc_path(fd: &impl AsRawFd) -> CString {
    CString::new(fd_path(fd.as_raw_fd()).into_os_string().into_vec()).expect("no NUL")
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn fstatat(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<()> {
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(odir: RawFd, old: &CStr, ndir: RawFd, new: &CStr, flags: u32) -> io::Result<()> {
    check(unsafe { libc::renameat2(odir, old.as_ptr(), ndir, new.as_ptr(), flags) }).map(drop)
}

pub fn linkat(odir: RawFd, old: &CStr, ndir: RawFd, new: &CStr, flags: i32) -> io::Result<()> {
    check(unsafe { libc::linkat(odir, old.as_ptr(), ndir, new.as_ptr(), flags) }).map(drop)
}

pub fn readlinkat(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// chown of the object a handle (O_PATH or not) refers to, itself even if
/// it is a symlink.
pub fn fchownat(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chown of `name` in `dir`, not following a final symlink.
pub fn lchownat(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

/// fchmodat2(2)'s number, the same on every architecture (it came after the
/// syscall tables were unified); libc does not define it for all of them.
const SYS_FCHMODAT2: libc::c_long = 452;

/// chmod of `name` in `dir`, not following a final symlink: a symlink gets
/// EOPNOTSUPP, as from chmod on a local disk's symlink (Linux has no symlink
/// modes). Before fchmodat2 (Linux 6.6) this takes an O_PATH handle, checks
/// its type and changes the mode through /proc/self/fd.
pub fn chmod_nofollow(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: a plain syscall on a live descriptor and a NUL-terminated name.
    let r = unsafe {
        libc::syscall(
            SYS_FCHMODAT2,
            dir,
            name.as_ptr(),
            mode,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    match check(r as libc::c_int) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {}
        r => return r.map(drop),
    }
    let fd = open_path(dir, name)?;
    if fstat(fd.as_raw_fd())?.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    chmod_path(&proc_path(&fd), mode)
}

/// What the kernel does on a write or truncate by a caller without
/// CAP_FSETID, done here because the mount takes it over
/// (FUSE_HANDLE_KILLPRIV_V2): clear set-user-ID, set-group-ID on a
/// group-executable file, and any file capability.
pub fn kill_privileges(fd: RawFd) -> io::Result<()> {
    let mode = fstat(fd)?.st_mode;
    let mut clear = libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        clear |= libc::S_ISGID;
    }
    if mode & clear != 0 {
        fchmod(fd, mode & !clear & 0o7777)?;
    }
    // Removing a security.* name needs privileges even when it is absent
    // (EPERM for an unprivileged daemon), so look first.
    let cap = c"security.capability";
    match check(unsafe { libc::fgetxattr(fd, cap.as_ptr(), std::ptr::null_mut(), 0) } as i32) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => match check(unsafe { libc::fremovexattr(fd, cap.as_ptr()) }) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
            r => r.map(drop),
        },
    }
}

/// chmod of an fd opened for I/O (not O_PATH).
pub fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    check(unsafe { libc::fchmod(fd, mode) }).map(drop)
}

/// Sets atime/mtime of an fd opened for I/O (not O_PATH).
pub fn futimens(fd: RawFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    check(unsafe { libc::futimens(fd, times.as_ptr()) }).map(drop)
}

/// Starts reading the first `len` bytes of `fd` into the page cache without
/// waiting for them. Best effort: a hint, so failures are ignored.
pub fn readahead(fd: RawFd, len: usize) {
    // SAFETY: a plain syscall on a descriptor the caller keeps open.
    unsafe { libc::readahead(fd, 0, len) };
}

/// Starts writing the dirty pages of `fd` in `[offset, offset + len)` to
/// disk without waiting for them. Best effort: a hint, so failures are
/// ignored (fsync still reports write errors).
pub fn start_writeback(fd: RawFd, offset: u64, len: u64) {
    // SAFETY: a plain syscall on a descriptor the caller keeps open.
    unsafe {
        libc::sync_file_range(
            fd,
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Allocates `len` bytes at `offset` without changing the file size. Ok(false)
/// when the filesystem cannot (EOPNOTSUPP).
pub fn allocate_keep_size(fd: RawFd, offset: u64, len: u64) -> io::Result<bool> {
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    match check(r) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The running kernel's (major, minor) version, from uname(2).
pub fn kernel_version() -> Option<(u32, u32)> {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    check(unsafe { libc::uname(&mut u) }).ok()?;
    let release = unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_str()
        .ok()?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// chmod of a path; only for /proc/self/fd paths of handles whose type was
/// checked (such a path is the object itself, whatever its name now is).
pub fn chmod_path(path: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

pub fn utimensat(
    dir: RawFd, name: &CStr, times: &[libc::timespec; 2], flags: i32,
) -> io::Result<()> {
    check(unsafe { libc::utimensat(dir, name.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

pub fn fstatvfs(fd: RawFd) -> io::Result<libc::statvfs> {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstatvfs(fd, &mut st) })?;
    Ok(st)
}

pub fn setxattr(
    path: &CStr, follow: bool, name: &CStr, value: &[u8], flags: i32,
) -> io::Result<()> {
    let f = if follow {
        libc::setxattr
    } else {
        libc::lsetxattr
    };
    check(unsafe {
        f(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// The whole value of xattr `name`.
pub fn getxattr(path: &CStr, follow: bool, name: &CStr) -> io::Result<Vec<u8>> {
    let get = if follow {
        libc::getxattr
    } else {
        libc::lgetxattr
    };
    loop {
        let n = unsafe { get(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        let m = unsafe {
            get(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if m < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue; // grew in between
            }
            return Err(e);
        }
        buf.truncate(m as usize);
        return Ok(buf);
    }
}

pub fn listxattr(path: &CStr, follow: bool) -> io::Result<Vec<u8>> {
    let list = if follow {
        libc::listxattr
    } else {
        libc::llistxattr
    };
    let n = unsafe { list(path.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; n as usize];
    let n = unsafe { list(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn removexattr(path: &CStr, follow: bool, name: &CStr) -> io::Result<()> {
    let remove = if follow {
        libc::removexattr
    } else {
        libc::lremovexattr
    };
    check(unsafe { remove(path.as_ptr(), name.as_ptr()) }).map(drop)
}

pub fn fsync(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    check(unsafe { libc::fsync(fd) }).map(drop)
}

pub fn flock(fd: RawFd, how: i32) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a descriptor the caller owns.
        match check(unsafe { libc::flock(fd, how) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(drop),
        }
    }
}

/// A shared `flock` on an open data file, held while the mount has it open
/// (`kmsfs rekey` takes an exclusive one for its swap, and skips a file it
/// cannot lock). A backing filesystem without working locks (ENOLCK: NFS
/// without lockd; EOPNOTSUPP) gets none, with a warning once.
pub fn share_lock(fd: RawFd) -> io::Result<()> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    flock_or_granted(fd, libc::LOCK_SH)?;
    if !locks_work() {
        WARNED.call_once(|| {
            tracing::warn!(
                "the backing filesystem refuses file locks: `kmsfs rekey` cannot tell which \
                 files this mount has open, so do not run it while mounted"
            )
        });
    }
    Ok(())
}

/// Set once a backing filesystem refused an flock (see `flock_or_granted`).
static LOCKS_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn locks_work() -> bool {
    !LOCKS_REFUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `flock(fd, how)`; Ok(false) when `LOCK_NB` is in `how` and another
/// holds a conflicting lock. A backing filesystem that refuses locks
/// altogether (ENOLCK: NFS without its lock daemon; EOPNOTSUPP, ENOSYS)
/// grants every one, as if it were alone.
pub fn flock_or_granted(fd: RawFd, how: i32) -> io::Result<bool> {
    match flock(fd, how) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
            ) =>
        {
            LOCKS_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// An open-file-description byte-range lock (`F_OFD_SETLK`, or
/// `F_OFD_SETLKW` with `wait`) of `typ` (`F_RDLCK`, `F_WRLCK`, `F_UNLCK`)
/// over `start..=end` of `fd`'s file. Returns false when `wait` is unset
/// and a conflicting lock is held. Such locks belong to the open file, not
/// the process, so two descriptors of one daemon exclude each other, and
/// NFS v4, GlusterFS and CephFS carry them to their other clients.
pub fn ofd_lock(fd: RawFd, typ: i32, start: u64, end: u64, wait: bool) -> io::Result<bool> {
    let mut fl = range_lock(typ, start, end);
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: fcntl on a descriptor the caller owns, with a valid flock.
        match check(unsafe { libc::fcntl(fd, cmd, &mut fl) }) {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if !wait && matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        }
    }
}

/// The first lock that would conflict with an OFD lock of `typ` over
/// `start..=end` on `fd` (`F_OFD_GETLK`), as (type, start, end), or None.
pub fn ofd_conflict(
    fd: RawFd, typ: i32, start: u64, end: u64,
) -> io::Result<Option<(i32, u64, u64)>> {
    let mut fl = range_lock(typ, start, end);
    // SAFETY: fcntl on a descriptor the caller owns, with a valid flock.
    check(unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) })?;
    if fl.l_type as i32 == libc::F_UNLCK {
        return Ok(None);
    }
    let from = fl.l_start as u64;
    let to = if fl.l_len == 0 {
        i64::MAX as u64
    } else {
        from + fl.l_len as u64 - 1
    };
    Ok(Some((fl.l_type as i32, from, to)))
}

fn range_lock(typ: i32, start: u64, end: u64) -> libc::flock {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start.min(i64::MAX as u64) as libc::off_t;
    // 0: to the end of every possible file.
    fl.l_len = if end >= i64::MAX as u64 {
        0
    } else {
        (end - start + 1) as libc::off_t
    };
    fl
}
