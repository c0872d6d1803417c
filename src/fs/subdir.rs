//! A directory of kmsfs's own at the backing root (`.kmsfs-intents`,
//! `.kmsfs-keys`): opened without following a symlink planted at its name,
//! and made (durably) only when something is first written into it, so a
//! volume that never needs it costs nothing.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use super::sys;

pub struct RootSubdir {
    /// O_PATH handle on the backing root.
    root: OwnedFd,
    name: CString,
    /// O_PATH handle on the directory, once it exists.
    dir: OnceLock<OwnedFd>,
}

/// Opens directory `name` in `root` if it is one (never following a
/// symlink planted there).
fn open_dir(root: RawFd, name: &CStr) -> std::io::Result<Option<OwnedFd>> {
    match sys::openat(
        root,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

impl RootSubdir {
    /// Directory `name` of backing root `root`, opened if it exists.
    pub fn new(root: OwnedFd, name: &str) -> std::io::Result<Self> {
        let name = CString::new(name).expect("no NUL");
        let dir = OnceLock::new();
        if let Some(fd) = open_dir(root.as_raw_fd(), &name)? {
            let _ = dir.set(fd);
        }
        Ok(Self { root, name, dir })
    }

    /// O_PATH handle on the backing root.
    pub fn root(&self) -> RawFd {
        self.root.as_raw_fd()
    }

    /// The directory if it existed when opened or was made since here.
    pub fn existing(&self) -> Option<RawFd> {
        self.dir.get().map(|fd| fd.as_raw_fd())
    }

    /// The directory if it exists now (another process may have made it
    /// since this one looked).
    pub fn current(&self) -> std::io::Result<Option<RawFd>> {
        if self.existing().is_none() {
            if let Some(fd) = open_dir(self.root(), &self.name)? {
                let _ = self.dir.set(fd);
            }
        }
        Ok(self.existing())
    }

    /// The directory, made (and made durable, so what is written into it
    /// survives a power loss) if it does not exist yet.
    pub fn made(&self) -> std::io::Result<RawFd> {
        if let Some(fd) = self.existing() {
            return Ok(fd);
        }
        match sys::mkdirat(self.root(), &self.name, 0o700) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
        sys::sync_dir(self.root())?;
        let fd = open_dir(self.root(), &self.name)?
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
        let _ = self.dir.set(fd);
        Ok(self.existing().expect("just set"))
    }
}
