//! The directory of redo records at the backing root (`format::intent`,
//! `names::INTENT_DIR`). It is made when the first record is written, so a
//! volume that never needed one costs nothing at open.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use super::error::{FsError, FsResult};
use super::sidecar::{self, SidecarError};
use super::subdir::RootSubdir;
use super::sys;
use crate::format::intent::{TruncateRecord, MAX_SEALED_BLOCK};
use crate::format::names::{truncate_record_ino, truncate_record_name, INTENT_DIR};

pub struct IntentDir {
    dir: RootSubdir,
}

fn record_name(ino: u64) -> CString {
    CString::new(truncate_record_name(ino)).expect("no NUL")
}

impl IntentDir {
    pub fn new(root: OwnedFd) -> std::io::Result<Self> {
        Ok(Self {
            dir: RootSubdir::new(root, INTENT_DIR)?,
        })
    }

    /// O_PATH handle on the backing root.
    pub fn root(&self) -> RawFd {
        self.dir.root()
    }

    fn existing(&self) -> Option<RawFd> {
        self.dir.existing()
    }

    fn made(&self) -> FsResult<RawFd> {
        Ok(self.dir.made()?)
    }

    /// Writes and syncs the record of a truncate of backing inode `ino`,
    /// replacing an older one.
    pub fn write_truncate(&self, ino: u64, record: &TruncateRecord) -> FsResult<()> {
        let dir = self.made()?;
        let bytes = record
            .encode()
            .map_err(|e| FsError::header("truncate record", e))?;
        let name = record_name(ino);
        let fd = sys::openat(
            dir,
            &name,
            libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NOCTTY,
            0o600,
        )?;
        let mut f = File::from(fd);
        if let Err(e) = f.write_all(&bytes).and_then(|_| f.sync_all()) {
            let _ = sys::unlinkat(dir, &name, 0);
            return Err(e.into());
        }
        crate::failpoint::synced();
        Ok(())
    }

    /// Whether a truncate record for backing inode `ino` exists: one
    /// lookup, and none at all while the directory does not exist.
    pub fn has_truncate(&self, ino: u64) -> bool {
        self.existing()
            .is_some_and(|dir| sys::fstatat(dir, &record_name(ino)).is_ok())
    }

    /// The backing inodes that have a truncate record.
    pub fn truncate_records(&self) -> FsResult<Vec<u64>> {
        let Some(dir) = self.existing() else {
            return Ok(Vec::new());
        };
        let mut inos = Vec::new();
        for entry in std::fs::read_dir(sys::fd_path(dir))? {
            let name = entry?.file_name();
            if let Some(ino) = truncate_record_ino(name.as_bytes()) {
                inos.push(ino);
            }
        }
        Ok(inos)
    }

    /// The truncate record of backing inode `ino`: None if there is none;
    /// a record that cannot be read or parsed is an error.
    pub fn read_truncate(&self, ino: u64) -> Result<Option<TruncateRecord>, SidecarError> {
        let Some(dir) = self.existing() else {
            return Ok(None);
        };
        let max = 2 * MAX_SEALED_BLOCK as u64;
        match sidecar::read_bounded_at(dir, &record_name(ino), max) {
            Ok(raw) => Ok(Some(TruncateRecord::parse(&raw)?)),
            Err(SidecarError::Missing) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the truncate record of backing inode `ino`, if any.
    pub fn remove_truncate(&self, ino: u64) -> FsResult<()> {
        let Some(dir) = self.existing() else {
            return Ok(());
        };
        match sys::unlinkat(dir, &record_name(ino), 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e.into()),
            _ => Ok(()),
        }
    }
}
