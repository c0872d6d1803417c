//! What `-o shared` mounts do so that several of them (on this machine or
//! others, over NFS, GlusterFS, CephFS...) can serve one backing directory
//! at once (docs/MOUNTING.md, "Shared mounts"; docs/ARCHITECTURE.md).
//!
//! Byte-range locks on a backing data file are the one channel between
//! mounts, and they serve two users, in two separate ranges so that they
//! never wait on each other:
//! - applications' own `fcntl`/`flock` locks, forwarded at their plaintext
//!   offsets, below [`APP_LOCK_END`] ([`AppLocks`]);
//! - the mount's own locks around a read-modify-write of sealed blocks,
//!   from [`INTERNAL_BASE`] up: a "size" byte that writers which change the
//!   file's length take exclusively (and every other writer shared), and
//!   one byte per block that an in-place writer takes exclusively
//!   ([`RemoteGuard`]). Readers take none: a read that meets a block being
//!   rewritten elsewhere fails to authenticate and is read again under
//!   shared locks, so the common case costs no lock round trip.
//!
//! All are open-file-description (OFD) locks: they belong to a descriptor,
//! so two mounts on one machine exclude each other as two machines do.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use super::sys;

/// Start of the mount's own lock range.
pub const INTERNAL_BASE: u64 = 1 << 62;
/// Applications' locks are forwarded clipped to end here (inclusive), so a
/// lock "to the end of the file" never covers the mount's own range.
pub const APP_LOCK_END: u64 = INTERNAL_BASE - 1;
/// Held shared by every shared mount that has the file open, and
/// exclusively by `kmsfs rekey` while it swaps the file (see `mark_open`).
const OPEN_BYTE: u64 = INTERNAL_BASE;
/// The byte writers that change a file's length hold exclusively.
const SIZE_BYTE: u64 = INTERNAL_BASE + 1;

/// The lock byte of block `index`.
fn block_byte(index: u64) -> u64 {
    (INTERNAL_BASE + 2).saturating_add(index)
}

/// Marks data file `fd` open on this mount, for `kmsfs rekey` (which
/// skips a file in use and swaps one under an exclusive lock): what
/// `sys::share_lock` does on a lone mount, but as an OFD lock on
/// [`OPEN_BYTE`]. A whole-file `flock` cannot be used here: GlusterFS and
/// NFS turn it into a byte-range lock over the whole file, which would
/// hold off every other mount's block locks and applications' locks.
/// Waits while a rekey swaps the file.
pub fn mark_open(fd: RawFd) -> io::Result<()> {
    sys::ofd_lock(fd, libc::F_RDLCK, OPEN_BYTE, OPEN_BYTE, true).map(drop)
}

/// For `kmsfs rekey`: takes [`OPEN_BYTE`] of `fd`'s file exclusively if no
/// shared mount has the file open (false otherwise); released when `fd`
/// closes or by [`unmark_swap`].
pub fn try_mark_swap(fd: RawFd) -> io::Result<bool> {
    sys::ofd_lock(fd, libc::F_WRLCK, OPEN_BYTE, OPEN_BYTE, false)
}

/// Ends a [`try_mark_swap`].
pub fn unmark_swap(fd: RawFd) {
    let _ = sys::ofd_lock(fd, libc::F_UNLCK, OPEN_BYTE, OPEN_BYTE, false);
}

/// Whether the filesystem holding `probe` (a file in the backing root)
/// grants OFD byte-range locks, which `-o shared` cannot do without: a
/// lock on a byte of the mounts' own range is taken and given back.
pub fn check_byte_range_locks(probe: &std::fs::File) -> io::Result<()> {
    let fd = probe.as_raw_fd();
    sys::ofd_lock(fd, libc::F_RDLCK, SIZE_BYTE, SIZE_BYTE, true)?;
    sys::ofd_lock(fd, libc::F_UNLCK, SIZE_BYTE, SIZE_BYTE, false).map(drop)
}

/// Locks on the backing file held by this mount for one request; released
/// on drop.
pub struct RemoteGuard {
    fd: RawFd,
    ranges: Vec<(u64, u64)>,
}

impl RemoteGuard {
    fn take(fd: RawFd, locks: &[(i32, u64, u64)]) -> io::Result<Self> {
        let mut guard = RemoteGuard {
            fd,
            ranges: Vec::with_capacity(locks.len()),
        };
        // Always in the same order (size byte first): no two mounts can
        // each hold what the other waits for.
        for &(typ, start, end) in locks {
            sys::ofd_lock(fd, typ, start, end, true)?;
            guard.ranges.push((start, end));
        }
        Ok(guard)
    }

    /// For a write that keeps the length: the size byte shared, the
    /// blocks `first..=last` exclusively.
    pub fn in_place(fd: RawFd, first: u64, last: u64) -> io::Result<Self> {
        Self::take(
            fd,
            &[
                (libc::F_RDLCK, SIZE_BYTE, SIZE_BYTE),
                (libc::F_WRLCK, block_byte(first), block_byte(last)),
            ],
        )
    }

    /// For a change of the length (append, truncate, fallocate): the size
    /// byte exclusively, which no other writer or re-reader holds then.
    pub fn resizing(fd: RawFd) -> io::Result<Self> {
        Self::take(fd, &[(libc::F_WRLCK, SIZE_BYTE, SIZE_BYTE)])
    }

    /// For reading blocks `first..=last` again after a failed check.
    pub fn reading(fd: RawFd, first: u64, last: u64) -> io::Result<Self> {
        Self::take(
            fd,
            &[
                (libc::F_RDLCK, SIZE_BYTE, SIZE_BYTE),
                (libc::F_RDLCK, block_byte(first), block_byte(last)),
            ],
        )
    }
}

impl Drop for RemoteGuard {
    fn drop(&mut self) {
        for &(start, end) in self.ranges.iter().rev() {
            if let Err(e) = sys::ofd_lock(self.fd, libc::F_UNLCK, start, end, false) {
                tracing::warn!("cannot release a byte-range lock on a backing file: {e}");
            }
        }
    }
}

/// A lock request of an application, as FUSE passes it.
#[derive(Clone, Copy, Debug)]
pub struct AppLock {
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    pub typ: i32,
}

impl AppLock {
    /// The range as forwarded: clipped below the mount's own locks; None
    /// when it lies wholly in them (refused with EINVAL).
    fn range(&self) -> Option<(u64, u64)> {
        (self.start <= APP_LOCK_END && self.start <= self.end)
            .then(|| (self.start, self.end.min(APP_LOCK_END)))
    }
}

/// Applications' locks of one open file, forwarded to the backing file: one
/// descriptor of it per lock owner (a process's POSIX locks, or one open
/// file's flock or OFD locks), so that owners on this mount exclude each
/// other as they would on a local disk, and owners on other mounts too.
/// Dropped with the open file: closing the descriptors releases every lock.
#[derive(Default)]
pub struct AppLocks {
    /// Shared out for each call, so a close (`release_owner`) on another
    /// thread cannot free the descriptor, nor its number be reused, while
    /// a lock call uses it.
    owners: Mutex<HashMap<u64, Arc<OwnedFd>>>,
}

/// The errno a lock request that lies past what can be forwarded gets.
fn out_of_range() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl AppLocks {
    /// `owner`'s descriptor of the file `data` is open on, made at its
    /// first lock.
    fn fd_of(&self, data: RawFd, owner: u64, writable: bool) -> io::Result<Arc<OwnedFd>> {
        let mut owners = self.owners.lock().unwrap();
        if let Some(fd) = owners.get(&owner) {
            return Ok(fd.clone());
        }
        let flags = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        let fd = Arc::new(sys::reopen(data, flags | libc::O_CLOEXEC)?);
        owners.insert(owner, fd.clone());
        Ok(fd)
    }

    /// The lock that would keep `lock` from being granted, as (type,
    /// start, end), or None.
    pub fn conflict(
        &self, data: RawFd, writable: bool, lock: &AppLock,
    ) -> io::Result<Option<(i32, u64, u64)>> {
        let (start, end) = lock.range().ok_or_else(out_of_range)?;
        let fd = self.fd_of(data, lock.owner, writable)?;
        Ok(
            sys::ofd_conflict(fd.as_raw_fd(), lock.typ, start, end)?.map(|(t, s, e)| {
                // A lock reaching our clip point reached the end of the file.
                (
                    t,
                    s,
                    if e >= APP_LOCK_END {
                        i64::MAX as u64
                    } else {
                        e
                    },
                )
            }),
        )
    }

    /// Takes, changes or releases `lock` (`F_UNLCK`) without waiting;
    /// EAGAIN when another owner holds a conflicting one.
    pub fn set(&self, data: RawFd, writable: bool, lock: &AppLock) -> io::Result<()> {
        self.apply(data, writable, lock, false)
    }

    /// Same, waiting for a conflicting lock to go. Blocks the thread.
    pub fn set_waiting(&self, data: RawFd, writable: bool, lock: &AppLock) -> io::Result<()> {
        self.apply(data, writable, lock, true)
    }

    fn apply(&self, data: RawFd, writable: bool, lock: &AppLock, wait: bool) -> io::Result<()> {
        if lock.typ == libc::F_UNLCK {
            if lock.start == 0 && lock.end >= APP_LOCK_END {
                // Everything released: the descriptor goes.
                self.release_owner(lock.owner);
                return Ok(());
            }
            let fd = match self.owners.lock().unwrap().get(&lock.owner) {
                Some(fd) => fd.clone(),
                None => return Ok(()),
            };
            let Some((start, end)) = lock.range() else {
                return Ok(());
            };
            return sys::ofd_lock(fd.as_raw_fd(), libc::F_UNLCK, start, end, false).map(drop);
        }
        let (start, end) = lock.range().ok_or_else(out_of_range)?;
        let fd = self.fd_of(data, lock.owner, writable)?;
        if sys::ofd_lock(fd.as_raw_fd(), lock.typ, start, end, wait)? {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EAGAIN))
        }
    }

    /// Releases every lock of `owner` (its descriptor closes): at close.
    pub fn release_owner(&self, owner: u64) {
        let Some(fd) = self.owners.lock().unwrap().remove(&owner) else {
            return;
        };
        // Released outright, not only by closing the descriptor: GlusterFS
        // (a FUSE client) drops a closed file's locks on its own time, and
        // another node must be able to lock as soon as this close returns.
        let _ = sys::ofd_lock(fd.as_raw_fd(), libc::F_UNLCK, 0, APP_LOCK_END, false);
    }
}

impl super::Core {
    /// The open file behind handle `fh`, its backing descriptor and whether
    /// write locks may be taken through it.
    fn locking(&self, fh: u64) -> super::error::FsResult<(super::handles::OpenFile, RawFd, bool)> {
        let (open, _) = self.handles.open_file(fh)?;
        let fd = open.cf.file().as_raw_fd();
        let writable = !self.read_only && !open.plain;
        Ok((open, fd, writable))
    }

    /// F_GETLK through handle `fh`: the lock that would conflict with
    /// `lock` (type, start, end), or None.
    pub fn getlk(
        &self, fh: u64, lock: &AppLock,
    ) -> super::error::FsResult<Option<(i32, u64, u64)>> {
        let (open, fd, writable) = self.locking(fh)?;
        Ok(open.cf.app_locks.conflict(fd, writable, lock)?)
    }

    /// F_SETLK through handle `fh`; `wait`: F_SETLKW (blocks the thread).
    pub fn setlk(&self, fh: u64, lock: &AppLock, wait: bool) -> super::error::FsResult<()> {
        let (open, fd, writable) = self.locking(fh)?;
        let locks = &open.cf.app_locks;
        match wait {
            true => locks.set_waiting(fd, writable, lock)?,
            false => locks.set(fd, writable, lock)?,
        }
        Ok(())
    }

    /// Releases every lock `owner` took through handle `fh` (its close).
    pub fn release_locks(&self, fh: u64, owner: u64) {
        if let Ok((open, _)) = self.handles.open_file(fh) {
            open.cf.app_locks.release_owner(owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writers_of_other_blocks_pass_and_a_resize_excludes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let (a, b) = (open(&path), open(&path));
        let held = RemoteGuard::in_place(a.as_raw_fd(), 0, 3).unwrap();
        // Another block: no wait. The same block or a resize would wait.
        drop(RemoteGuard::in_place(b.as_raw_fd(), 4, 4).unwrap());
        let free = |typ, start, end| {
            sys::ofd_conflict(b.as_raw_fd(), typ, start, end)
                .unwrap()
                .is_none()
        };
        assert!(!free(libc::F_WRLCK, block_byte(2), block_byte(2)));
        assert!(!free(libc::F_WRLCK, SIZE_BYTE, SIZE_BYTE));
        assert!(free(libc::F_RDLCK, SIZE_BYTE, SIZE_BYTE));
        drop(held);
        assert!(free(libc::F_WRLCK, SIZE_BYTE, block_byte(u64::MAX)));
    }

    #[test]
    fn application_locks_exclude_other_owners_and_never_reach_internal_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let data = open(&path);
        let locks = AppLocks::default();
        let whole = |owner, typ| AppLock {
            owner,
            start: 0,
            end: i64::MAX as u64,
            typ,
        };
        locks
            .set(data.as_raw_fd(), true, &whole(1, libc::F_WRLCK))
            .unwrap();
        let e = locks
            .set(data.as_raw_fd(), true, &whole(2, libc::F_RDLCK))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
        let seen = locks
            .conflict(data.as_raw_fd(), true, &whole(2, libc::F_RDLCK))
            .unwrap();
        assert_eq!(seen, Some((libc::F_WRLCK, 0, i64::MAX as u64)));
        // The mount's own locks are untouched by an application's
        // whole-file lock.
        let internal = sys::ofd_conflict(data.as_raw_fd(), libc::F_WRLCK, SIZE_BYTE, u64::MAX);
        assert_eq!(internal.unwrap(), None);
        locks
            .set(data.as_raw_fd(), true, &whole(1, libc::F_UNLCK))
            .unwrap();
        locks
            .set(data.as_raw_fd(), true, &whole(2, libc::F_RDLCK))
            .unwrap();
    }
}
