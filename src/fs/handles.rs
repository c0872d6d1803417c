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

/// An open file or directory handle.
enum Handle {
    File(Arc<CryptFile>),
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

    pub fn add_file(&self, cf: Arc<CryptFile>) -> u64 {
        self.add(Handle::File(cf))
    }

    pub fn add_dir(&self, entries: DirEntries) -> u64 {
        self.add(Handle::Dir(Arc::new(entries)))
    }

    pub fn file(&self, fh: u64) -> FsResult<Arc<CryptFile>> {
        match self.map.read().unwrap().get(&fh) {
            Some(Handle::File(f)) => Ok(f.clone()),
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
