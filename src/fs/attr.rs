//! Attributes: what `getattr` reports (the backing object's own, with the
//! plaintext size derived from the ciphertext size) and `setattr`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

use super::error::{FsError, FsResult};
use super::inode::{kind_of, Inode};
use super::{Caller, Core};

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    let special = |nsec| libc::timespec {
        tv_sec: 0,
        tv_nsec: nsec,
    };
    match t {
        None => special(libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => special(libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            },
            Err(e) => {
                let d = e.duration();
                let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if n < 0 {
                    s -= 1;
                    n += 1_000_000_000;
                }
                libc::timespec {
                    tv_sec: s,
                    tv_nsec: n,
                }
            }
        },
    }
}

/// What `setattr` was asked to change.
#[derive(Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    /// The handle the change came through, if any.
    pub fh: Option<u64>,
}

impl Core {
    /// The attributes of `inode`, whose backing object has stat `st`, as
    /// the mount shows them; `plain`: a plaintext pass-through file.
    pub(super) fn attr(&self, st: &libc::stat, inode: &Inode, plain: bool) -> FileAttr {
        let kind = kind_of(st.st_mode);
        let size = if kind == FileType::RegularFile && !plain {
            self.size_geometry(inode).plaintext_size(st.st_size as u64)
        } else {
            st.st_size as u64
        };
        FileAttr {
            ino: INodeNo(self.inodes.fuse_ino(st.st_ino)),
            size,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<FileAttr> {
        let inode = self.inodes.get(ino)?;
        let st = self.inodes.reach(&inode)?.stat()?;
        let plain = inode.kind == FileType::RegularFile && self.is_plain(&inode, &st)?;
        Ok(self.attr(&st, &inode, plain))
    }

    pub async fn setattr(&self, ino: u64, set: SetAttr, caller: Caller) -> FsResult<FileAttr> {
        let inode = self.inodes.get(ino)?;
        let changes_content =
            set.mode.is_some() || set.uid.is_some() || set.gid.is_some() || set.size.is_some();
        if self.read_only && changes_content {
            return Err(FsError::errno(libc::EROFS));
        }
        if set.mode.is_some() && inode.kind == FileType::Symlink {
            return Err(FsError::errno(libc::EOPNOTSUPP));
        }
        let target = self.inodes.reach(&inode)?;
        if set.uid.is_some() || set.gid.is_some() {
            target.chown(set.uid.unwrap_or(u32::MAX), set.gid.unwrap_or(u32::MAX))?;
        }
        if let Some(mode) = set.mode {
            target.chmod(mode & 0o7777)?;
        }
        if let Some(size) = set.size {
            match inode.kind {
                FileType::RegularFile => {}
                FileType::Directory => return Err(FsError::errno(libc::EISDIR)),
                _ => return Err(FsError::errno(libc::EINVAL)),
            }
            let open = match set.fh.and_then(|fh| self.handles.open_file(fh).ok()) {
                Some((open, _)) => open,
                None => self.crypt_file(&inode, None, None).await?,
            };
            if open.plain {
                return Err(Self::plaintext_refused(&self.inodes.label(&inode)));
            }
            let cf = open.cf;
            // The kernel leaves this to us (FUSE_HANDLE_KILLPRIV_V2) but does
            // not pass fuser its flag; root stands in for CAP_FSETID.
            if caller.uid != 0 {
                cf.kill_privileges()?;
            }
            cf.truncate(size)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            target.set_times(&[timespec(set.atime), timespec(set.mtime)])?;
        }
        self.getattr(ino)
    }
}
