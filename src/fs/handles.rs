//! Open file and directory handles, by FUSE handle number.

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use fuser::FileType;

use super::crypt_file::CryptFile;
use super::error::{FsError, FsResult};

/// A directory listing: (fuse ino, kind, name).
pub type DirEntries = Vec<(u64, FileType, OsString)>;

/// A regular file's shared open state, and whether it was made as a
/// plaintext pass-through file (which never receives writes).
#[derive(Clone)]
pub struct OpenFile {
    pub cf: Arc<CryptFile>,
    pub plain: bool,
}

/// An open file or directory handle.
enum Handle {
    /// With the FUSE inode number, to name the file in log lines.
    File(OpenFile, u64),
    /// Directory snapshot taken at opendir.
    Dir(Arc<DirEntries>),
}

#[derive(Default)]
pub struct HandleTable {
    map: RwLock<HashMap<u64, Handle>>,
    next: AtomicU64,
}

impl HandleTable {
    fn add(&self, h: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.map.write().unwrap().insert(fh, h);
        fh
    }

    pub fn add_file(&self, open: OpenFile, ino: u64) -> u64 {
        self.add(Handle::File(open, ino))
    }

    pub fn add_dir(&self, entries: DirEntries) -> u64 {
        self.add(Handle::Dir(Arc::new(entries)))
    }

    /// The open state behind an open file handle.
    pub fn file(&self, fh: u64) -> FsResult<Arc<CryptFile>> {
        self.open_file(fh).map(|(open, _)| open.cf)
    }

    /// The open state behind an open file handle, whether it is plaintext,
    /// and the file's FUSE inode number.
    pub fn open_file(&self, fh: u64) -> FsResult<(OpenFile, u64)> {
        match self.map.read().unwrap().get(&fh) {
            Some(Handle::File(open, ino)) => Ok((open.clone(), *ino)),
            _ => Err(FsError::errno(libc::EBADF)),
        }
    }

    /// The snapshot behind an open directory handle.
    pub fn dir(&self, fh: u64) -> FsResult<Arc<DirEntries>> {
        match self.map.read().unwrap().get(&fh) {
            Some(Handle::Dir(entries)) => Ok(entries.clone()),
            _ => Err(FsError::errno(libc::EBADF)),
        }
    }

    pub fn release(&self, fh: u64) {
        let gone = self.map.write().unwrap().remove(&fh);
        // Dropped outside the lock: closing the last descriptor of an
        // unlinked file frees its blocks, which takes a while.
        drop(gone);
    }
}
