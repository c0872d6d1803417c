//! Directory listing: a snapshot taken at opendir, served by readdir and
//! readdirplus, without kmsfs's reserved names.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use fuser::{FileAttr, FileType};

use super::error::FsResult;
use super::inode::ROOT_INO;
use super::{sys, Core};
use crate::format::names::is_reserved;

impl Core {
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let inode = self.inodes.dir(ino)?;
        let parent_ino = inode.location().map_or(ROOT_INO, |(p, _)| p);
        let path = sys::proc_path(&inode.raw_fd());
        let mut entries = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (parent_ino, FileType::Directory, OsString::from("..")),
        ];
        for e in std::fs::read_dir(OsStr::from_bytes(path.as_bytes()))? {
            let e = e?;
            let name = e.file_name();
            if is_reserved(name.as_bytes()) {
                continue;
            }
            use std::os::unix::fs::DirEntryExt;
            let kind = FileType::from_std(e.file_type()?).unwrap_or(FileType::RegularFile);
            entries.push((self.inodes.fuse_ino(e.ino()), kind, name));
        }
        Ok(self.handles.add_dir(entries))
    }

    /// Entries of an open directory from `offset` on; `add` returns true when
    /// the reply is full.
    pub fn readdir(
        &self, fh: u64, offset: u64, mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> FsResult<()> {
        let entries = self.handles.dir(fh)?;
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    /// readdirplus: entries with their attributes, each (but . and ..)
    /// counting as a lookup, which saves the kernel one LOOKUP per entry.
    pub fn readdirplus(
        &self, ino: u64, fh: u64, offset: u64,
        mut add: impl FnMut(u64, u64, &OsStr, &FileAttr) -> bool,
    ) -> FsResult<()> {
        let entries = self.handles.dir(fh)?;
        let dir = self.inodes.dir(ino)?;
        for (i, (entry_ino, _, name)) in entries.iter().enumerate().skip(offset as usize) {
            let next = i as u64 + 1;
            if name == "." || name == ".." {
                let Ok(attr) = self.getattr(*entry_ino) else {
                    continue;
                };
                if add(*entry_ino, next, name, &attr) {
                    break;
                }
                continue;
            }
            let Ok((_, attr)) = self.lookup_in(ino, &dir, name) else {
                continue; // gone since opendir
            };
            if add(attr.ino.0, next, name, &attr) {
                // Not sent: take back the lookup it counted.
                self.forget(attr.ino.0, 1);
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.release(fh);
    }
}
