//! The inode table: which backing objects the kernel knows, under which
//! FUSE inode numbers, and how each is reached (`Reach`).
//!
//! Inodes are keyed by the backing inode number; the backing root is swapped
//! with FUSE inode 1. Directories hold an O_PATH handle (valid across
//! renames); other objects hold none, so a large tree does not exhaust the
//! open-files limit, and are reached through their open file while one is
//! open (also after unlink), else by name in their parent directory.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use fuser::FileType;

use super::crypt_file::CryptFile;
use super::error::{FsError, FsResult};
use super::handles::OpenFile;
use super::sidecar::FileHeader;
use super::sys;

pub const ROOT_INO: u64 = 1;

/// The FUSE file type of a `st_mode`.
pub fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// A backing name (untrusted bytes) as it goes into log lines and errors:
/// control characters, backslashes and bytes that are not UTF-8 are escaped
/// (`\n`, `\u{1b}`, `\\`, `\xff`), so that a name can neither start a
/// forged log line nor pass for something else.
pub fn escape_name(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                // Quotes delimit nothing in a log line: keep them readable.
                '"' | '\'' => out.push(c),
                c => out.extend(c.escape_debug()),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The shared open state of a regular file while any handle is open, and
/// whether it was made as a plaintext pass-through file.
#[derive(Default)]
pub struct OpenSlot {
    file: Weak<CryptFile>,
    plain: bool,
}

impl OpenSlot {
    pub fn get(&self) -> Option<OpenFile> {
        self.file.upgrade().map(|cf| OpenFile {
            cf,
            plain: self.plain,
        })
    }

    pub fn set(&mut self, open: &OpenFile) {
        self.file = Arc::downgrade(&open.cf);
        self.plain = open.plain;
    }
}

/// One object of the backing tree the kernel knows about.
pub struct Inode {
    pub kind: FileType,
    /// Backing device and inode number: what a name must still lead to
    /// before the mount opens the object's data by that name.
    pub dev: u64,
    pub backing_ino: u64,
    /// O_PATH handle on a backing directory: stays valid across renames.
    /// None for every other kind (see the module documentation).
    pub fd: Option<OwnedFd>,
    /// Kernel lookup count; the entry is dropped when it reaches zero.
    lookups: AtomicU64,
    /// Last known (parent inode, name); None for the root, or once the name
    /// was unlinked. Needed to find the sidecar and for log lines.
    pub location: Mutex<Option<(u64, OsString)>>,
    /// Further names of a hard-linked file, so it stays reachable when the
    /// name in `location` is unlinked or renamed away.
    other_names: Mutex<Vec<(u64, OsString)>>,
    /// Shared open state while any handle is open (regular files).
    pub open_file: Mutex<OpenSlot>,
    /// The sidecar header as last read. Read once, and again only when it
    /// fails to open the file (a `kmsfs rewrap` may have replaced it: same
    /// DEK and file ID, other wraps).
    pub header: RwLock<Option<Arc<FileHeader>>>,
    /// An O_PATH handle taken when the object's last name goes (unlink,
    /// rename over it) while the kernel still knows the inode. It keeps the
    /// backing inode number from being reused by a new object until the
    /// kernel forgets this one: inodes are keyed by that number, and a new
    /// directory must not be taken for the old file.
    pub pinned: Mutex<Option<OwnedFd>>,
    /// Set once the file's head went into the kernel's page cache at an open
    /// (`Core::fill_page_cache`); not again while the kernel knows the inode.
    pub filled: AtomicBool,
}

impl Inode {
    fn new(st: &libc::stat, fd: Option<OwnedFd>, location: Option<(u64, OsString)>) -> Self {
        Inode {
            kind: kind_of(st.st_mode),
            dev: st.st_dev,
            backing_ino: st.st_ino,
            fd,
            lookups: AtomicU64::new(1),
            location: Mutex::new(location),
            other_names: Mutex::new(Vec::new()),
            open_file: Mutex::new(OpenSlot::default()),
            header: RwLock::new(None),
            pinned: Mutex::new(None),
            filled: AtomicBool::new(false),
        }
    }

    /// Makes (parent, name) the name the inode is reached by, keeping the
    /// previous one as an alternative (hard links).
    pub fn note_name(&self, parent: u64, name: &OsStr) {
        let mut loc = self.location.lock().unwrap();
        let mut others = self.other_names.lock().unwrap();
        others.retain(|(p, n)| !(*p == parent && n == name));
        if let Some(old) = loc.take() {
            if !(old.0 == parent && old.1 == name) && self.kind != FileType::Directory {
                others.push(old);
            }
        }
        *loc = Some((parent, name.to_owned()));
    }

    /// Forgets (parent, name), falling back to another known name.
    pub fn drop_name(&self, parent: u64, name: &OsStr) {
        let mut loc = self.location.lock().unwrap();
        let mut others = self.other_names.lock().unwrap();
        others.retain(|(p, n)| !(*p == parent && n == name));
        if matches!(&*loc, Some((p, n)) if *p == parent && n == name) {
            *loc = others.pop();
        }
    }

    /// The current (parent, name), if the object still has one.
    pub fn location(&self) -> Option<(u64, OsString)> {
        self.location.lock().unwrap().clone()
    }

    /// The O_PATH handle of a directory inode.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
            .as_ref()
            .expect("directory inodes hold a handle")
            .as_raw_fd()
    }

    /// The open state of a regular file, while any handle is open.
    pub fn open_state(&self) -> Option<Arc<CryptFile>> {
        self.open_file().map(|o| o.cf)
    }

    /// The open state with whether it is plaintext, while any handle is open.
    pub fn open_file(&self) -> Option<OpenFile> {
        self.open_file.lock().unwrap().get()
    }
}

/// How the backing object of an inode is reached (see `InodeTable::reach`).
/// Each variant keeps what it refers to alive while it is used.
pub enum Reach {
    /// A directory, through its own O_PATH handle.
    Dir(Arc<Inode>),
    /// A file with open handles, through its open file (also after unlink).
    Open(Arc<CryptFile>),
    /// A file whose last name went while the kernel still knows it, with no
    /// handle open: through a copy of its pinned O_PATH handle. The kernel
    /// writes back cached times (FUSE_SETATTR) and asks for attributes of
    /// such an inode; a local filesystem answers those, so must we.
    Unlinked(OwnedFd),
    /// Anything else by name in its directory (final symlink not followed).
    At(Arc<Inode>, CString),
}

impl Reach {
    pub fn stat(&self) -> std::io::Result<libc::stat> {
        match self {
            Reach::Dir(d) => sys::fstat(d.raw_fd()),
            Reach::Open(cf) => sys::fstat(cf.file().as_raw_fd()),
            Reach::Unlinked(fd) => sys::fstat(fd.as_raw_fd()),
            Reach::At(dir, name) => sys::fstatat(dir.raw_fd(), name),
        }
    }

    pub fn chown(&self, uid: u32, gid: u32) -> std::io::Result<()> {
        match self {
            Reach::Dir(d) => sys::fchownat(d.raw_fd(), uid, gid),
            Reach::Open(cf) => sys::fchownat(cf.file().as_raw_fd(), uid, gid),
            Reach::Unlinked(fd) => sys::fchownat(fd.as_raw_fd(), uid, gid),
            Reach::At(dir, name) => sys::lchownat(dir.raw_fd(), name, uid, gid),
        }
    }

    pub fn chmod(&self, mode: u32) -> std::io::Result<()> {
        match self {
            // fchmod refuses O_PATH handles.
            Reach::Dir(d) => sys::chmod_path(&sys::proc_path(&d.raw_fd()), mode),
            Reach::Open(cf) => sys::fchmod(cf.file().as_raw_fd(), mode),
            Reach::Unlinked(fd) => sys::chmod_path(&sys::proc_path(fd), mode),
            Reach::At(dir, name) => sys::chmod_nofollow(dir.raw_fd(), name, mode),
        }
    }

    pub fn set_times(&self, times: &[libc::timespec; 2]) -> std::io::Result<()> {
        match self {
            Reach::Dir(d) => sys::utimensat(libc::AT_FDCWD, &sys::proc_path(&d.raw_fd()), times, 0),
            Reach::Open(cf) => sys::futimens(cf.file().as_raw_fd(), times),
            Reach::Unlinked(fd) => sys::utimensat(libc::AT_FDCWD, &sys::proc_path(fd), times, 0),
            Reach::At(dir, name) => {
                sys::utimensat(dir.raw_fd(), name, times, libc::AT_SYMLINK_NOFOLLOW)
            }
        }
    }

    /// A path for the *xattr calls, and whether they may follow it.
    pub fn xattr_path(&self) -> (CString, bool) {
        match self {
            Reach::Dir(d) => (sys::proc_path(&d.raw_fd()), true),
            Reach::Open(cf) => (sys::proc_path(&cf.file().as_raw_fd()), true),
            Reach::Unlinked(fd) => (sys::proc_path(fd), true),
            Reach::At(dir, name) => {
                let mut p = format!("/proc/self/fd/{}/", dir.raw_fd()).into_bytes();
                p.extend_from_slice(name.as_bytes());
                (CString::new(p).expect("no NUL"), false)
            }
        }
    }
}

/// Every inode the kernel knows, keyed by FUSE inode number.
pub struct InodeTable {
    /// The backing root, FUSE inode 1.
    pub root: Arc<Inode>,
    /// Backing inode number of the root.
    root_backing_ino: u64,
    /// Invariant: holds every inode with a non-zero lookup count, plus root.
    map: RwLock<HashMap<u64, Arc<Inode>>>,
}

impl InodeTable {
    /// A table holding the backing root, reached through `root_fd`.
    pub fn new(root_fd: OwnedFd) -> std::io::Result<Self> {
        let st = sys::fstat(root_fd.as_raw_fd())?;
        let root = Arc::new(Inode::new(&st, Some(root_fd), None));
        let mut map = HashMap::new();
        map.insert(ROOT_INO, root.clone());
        Ok(InodeTable {
            root,
            root_backing_ino: st.st_ino,
            map: RwLock::new(map),
        })
    }

    /// FUSE inode number of a backing inode number (root is always 1).
    pub fn fuse_ino(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_backing_ino {
            ROOT_INO
        } else if backing_ino == ROOT_INO {
            self.root_backing_ino
        } else {
            backing_ino
        }
    }

    pub fn get(&self, ino: u64) -> FsResult<Arc<Inode>> {
        self.map
            .read()
            .unwrap()
            .get(&ino)
            .cloned()
            .ok_or_else(|| FsError::errno(libc::ENOENT))
    }

    /// The inode of the backing object with stat `st`, if the kernel knows it.
    pub fn known(&self, st: &libc::stat) -> Option<Arc<Inode>> {
        self.map
            .read()
            .unwrap()
            .get(&self.fuse_ino(st.st_ino))
            .cloned()
    }

    pub fn dir(&self, ino: u64) -> FsResult<Arc<Inode>> {
        let i = self.get(ino)?;
        if i.kind != FileType::Directory {
            return Err(FsError::errno(libc::ENOTDIR));
        }
        Ok(i)
    }

    /// Records that the kernel now knows `name` in `parent` (one lookup).
    pub fn remember(
        &self, parent: u64, name: &OsStr, fd: Option<OwnedFd>, st: &libc::stat,
    ) -> Arc<Inode> {
        let ino = self.fuse_ino(st.st_ino);
        let mut map = self.map.write().unwrap();
        let mut lookups = 1;
        if let Some(existing) = map.get(&ino) {
            if existing.kind == kind_of(st.st_mode) || ino == ROOT_INO {
                existing.lookups.fetch_add(1, Ordering::Relaxed);
                if ino != ROOT_INO {
                    existing.note_name(parent, name);
                }
                return existing.clone();
            }
            // Another mount sharing the backing directory removed the old
            // object and its inode number now names one of another kind.
            // The kernel drops its inode of the old kind when it sees the
            // new kind; the lookups it holds carry over, so its forgets
            // still balance.
            lookups += existing.lookups.load(Ordering::Relaxed);
        }
        let inode = Arc::new(Inode::new(st, fd, Some((parent, name.to_owned()))));
        inode.lookups.store(lookups, Ordering::Relaxed);
        map.insert(ino, inode.clone());
        inode
    }

    /// Takes back `n` lookups; returns the inode when that was its last.
    pub fn forget(&self, ino: u64, n: u64) -> Option<Arc<Inode>> {
        if ino == ROOT_INO {
            return None;
        }
        let mut map = self.map.write().unwrap();
        match map.get(&ino) {
            Some(i) if i.lookups.fetch_sub(n, Ordering::Relaxed) <= n => map.remove(&ino),
            _ => None,
        }
    }

    /// Backing-relative path of an inode as raw bytes ("" for the root,
    /// "a/b"), from the names the kernel last looked it up by; None once
    /// unlinked.
    fn rel_bytes(&self, inode: &Inode) -> Option<Vec<u8>> {
        if std::ptr::eq(inode, &*self.root) {
            return Some(Vec::new());
        }
        let mut parts = Vec::new();
        let mut loc = inode.location();
        while let Some((parent, name)) = loc {
            parts.push(name);
            if parent == ROOT_INO {
                let mut path = Vec::new();
                for p in parts.iter().rev() {
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(p.as_bytes());
                }
                return Some(path);
            }
            if parts.len() > 4096 {
                return None;
            }
            loc = self.map.read().unwrap().get(&parent)?.location();
        }
        None
    }

    /// Mount-relative path ("/" or "/a/b") of an inode, for policy lookups;
    /// None once unlinked.
    pub fn rel_path(&self, inode: &Inode) -> Option<String> {
        self.rel_bytes(inode)
            .map(|p| format!("/{}", String::from_utf8_lossy(&p)))
    }

    /// Backing-relative path of an inode, escaped for log lines.
    pub fn label(&self, inode: &Inode) -> String {
        match self.rel_bytes(inode) {
            Some(p) => escape_name(&p),
            None => "(unlinked file)".into(),
        }
    }

    /// Backing-relative path of `name` in directory `dir`, escaped for log
    /// lines.
    pub fn label_at(&self, dir: &Inode, name: &OsStr) -> String {
        let mut p = self.rel_bytes(dir).unwrap_or_default();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        escape_name(&p)
    }

    /// Where an inode's backing object can be reached: a directory through
    /// its own handle, a file through its open file (which also works after
    /// unlink) or, unlinked and closed, its pinned handle, anything else by
    /// its parent directory and name.
    pub fn reach(&self, inode: &Arc<Inode>) -> FsResult<Reach> {
        if inode.fd.is_some() {
            return Ok(Reach::Dir(inode.clone()));
        }
        if let Some(cf) = inode.open_state() {
            return Ok(Reach::Open(cf));
        }
        let Some((parent, name)) = inode.location() else {
            if let Some(pinned) = inode.pinned.lock().unwrap().as_ref() {
                return Ok(Reach::Unlinked(pinned.try_clone()?));
            }
            return Err(FsError::errno(libc::ENOENT));
        };
        Ok(Reach::At(self.dir(parent)?, sys::cstr(&name)?))
    }

    /// Before `name` in `dir` (with stat `st`) loses what may be its last
    /// link: if the kernel still knows that inode, pin the backing object
    /// (see `Inode::pinned`). Directories hold their handle anyway.
    pub fn pin_if_last_name(&self, dir: &Inode, name: &std::ffi::CStr, st: &libc::stat) {
        if kind_of(st.st_mode) == FileType::Directory || st.st_nlink > 1 {
            return;
        }
        let Some(inode) = self.known(st) else {
            return;
        };
        if let Ok(fd) = sys::open_path(dir.raw_fd(), name) {
            *inode.pinned.lock().unwrap() = Some(fd);
        }
    }

    /// After a name went away: the inode keeps working through its fd, but
    /// no longer has that name.
    pub fn forget_name(&self, parent: u64, name: &OsStr, st: &libc::stat) {
        if let Some(inode) = self.known(st) {
            inode.drop_name(parent, name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escape_name;

    #[test]
    fn names_are_escaped_for_log_lines() {
        assert_eq!(escape_name(b"dir/plain name.txt"), "dir/plain name.txt");
        assert_eq!(
            escape_name(b"a\nERROR forged\r\t\x1b[31m\\"),
            "a\\nERROR forged\\r\\t\\u{1b}[31m\\\\"
        );
        assert_eq!(
            escape_name("caf\u{e9} \"q\" 'q'".as_bytes()),
            "caf\u{e9} \"q\" 'q'"
        );
        assert_eq!(escape_name(b"bad\xff\xfe"), "bad\\xff\\xfe");
        assert_eq!(
            escape_name("line\u{2028}sep".as_bytes()),
            "line\\u{2028}sep"
        );
    }
}
