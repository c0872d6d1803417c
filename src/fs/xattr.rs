//! Extended attributes: which names pass through to the backing object, and
//! which are refused (`XattrClass`), in one table.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;

use super::error::{FsError, FsResult};
use super::inode::Reach;
use super::{sys, Core};

/// What kmsfs does with an extended attribute name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XattrClass {
    /// `user.kmsfs.*`: kmsfs's own; invisible, and not to be set.
    Reserved,
    /// Not kept, answered EOPNOTSUPP on get and set (so tools such as
    /// `ls -l` stop asking per file, and `setfacl` fails instead of storing
    /// a no-op):
    /// - POSIX ACLs: neither the kernel (no FUSE_POSIX_ACL) nor kmsfs
    ///   enforces them, so a stored ACL would only look like protection;
    /// - `security.selinux`: a FUSE mount's label comes from the security
    ///   module (genfscon or the `context=` mount option), which answers
    ///   before the daemon is asked; a stored label would have no effect.
    Unsupported,
    /// Everything else, kept on the backing file.
    Kept,
}

impl XattrClass {
    fn of(name: &OsStr) -> XattrClass {
        match name.as_bytes() {
            n if n.starts_with(b"user.kmsfs.") => XattrClass::Reserved,
            b"system.posix_acl_access" | b"system.posix_acl_default" | b"security.selinux" => {
                XattrClass::Unsupported
            }
            _ => XattrClass::Kept,
        }
    }

    /// Whether `op` goes through to the backing object, or the error that
    /// answers it instead. Removing an unsupported name goes through, so
    /// that ACLs an earlier version stored can still be cleared
    /// (`setfacl -b`).
    fn allows(self, op: XattrOp) -> FsResult<()> {
        let refused = match (self, op) {
            (XattrClass::Kept, _) | (XattrClass::Unsupported, XattrOp::Remove) => return Ok(()),
            (XattrClass::Reserved, XattrOp::Get) => libc::ENODATA,
            (XattrClass::Reserved, _) => libc::EPERM,
            (XattrClass::Unsupported, _) => libc::EOPNOTSUPP,
        };
        Err(FsError::errno(refused))
    }
}

/// An extended-attribute request, for `XattrClass::allows`.
#[derive(Debug, Clone, Copy)]
enum XattrOp {
    Get,
    Set,
    Remove,
}

impl Core {
    /// A path to reach an inode's xattrs, whether the final name may be
    /// followed, and what keeps that path valid while it is used.
    fn xattr_path(&self, ino: u64) -> FsResult<(CString, bool, Reach)> {
        let reach = self.inodes.reach(&self.inodes.get(ino)?)?;
        let (path, follow) = reach.xattr_path();
        Ok((path, follow, reach))
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        XattrClass::of(name).allows(XattrOp::Set)?;
        let (path, follow, _keep) = self.xattr_path(ino)?;
        Ok(sys::setxattr(
            &path,
            follow,
            &sys::cstr(name)?,
            value,
            flags,
        )?)
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        XattrClass::of(name).allows(XattrOp::Get)?;
        let (path, follow, _keep) = self.xattr_path(ino)?;
        Ok(sys::getxattr(&path, follow, &sys::cstr(name)?)?)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (path, follow, _keep) = self.xattr_path(ino)?;
        let all = sys::listxattr(&path, follow)?;
        let mut out = Vec::with_capacity(all.len());
        for n in all.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if XattrClass::of(OsStr::from_bytes(n)) == XattrClass::Kept {
                out.extend_from_slice(n);
                out.push(0);
            }
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        XattrClass::of(name).allows(XattrOp::Remove)?;
        let (path, follow, _keep) = self.xattr_path(ino)?;
        Ok(sys::removexattr(&path, follow, &sys::cstr(name)?)?)
    }
}
