//! The filesystem: backing-directory logic ([`Core`]) and the thin fuser
//! adapter (`adapter`), which turns [`FsError`] into errno in one place.

mod adapter;
mod background;
pub mod crypt_file;
pub mod error;
mod sys;

pub use adapter::{mount, MountOptions};

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

use crate::cache::DekCache;
use crate::config::{ActivePolicy, Config, Connected};
use crate::crypto::{self, BlockCipher};
use crate::format::header::{self as hdr, Header, ParsedHeader};
use crate::format::names::{is_reserved, sidecar_name};
use crate::format::BlockGeometry;
use crate::kms::{KeyProvider, KmsRuntime, ProviderSet, WrapContext, WrappedDek};
use crate::metrics::Metrics;
use crate::policy::{governing_by, is_within};
use background::Worker;
use crypt_file::{CryptFile, PendingDurability};
use error::{FsError, FsResult};

const ROOT_INO: u64 = 1;
/// Sidecars are small; anything larger is not one of ours.
const MAX_SIDECAR_LEN: u64 = 64 * 1024;
/// Plaintext put into the kernel's page cache when a file is first opened
/// for reading (a whole small file; see `Core::fill_page_cache`). Its
/// ciphertext is read ahead at every first open.
const OPEN_FILL: u64 = 128 * 1024;
/// Opening a sidecar to read it: a FIFO planted under a sidecar's name in
/// the backing directory must not block the opener (no effect on files).
const SIDECAR_READ_FLAGS: i32 = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;

/// A wrapped DEK with the context it was wrapped under.
type UnwrapItem = (WrappedDek, WrapContext);

/// See `Core::page_filler`: (FUSE inode, bytes for offset 0).
pub type PageFiller = Box<dyn Fn(u64, &[u8]) -> std::io::Result<()> + Send + Sync>;

thread_local! {
    /// Per-thread plaintext scratch, reused so that READ replies and
    /// page-cache fills do not allocate per request. Neither use runs inside
    /// the other, so it is never borrowed twice.
    static PLAINTEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's plaintext scratch (see `PLAINTEXT`).
pub(crate) fn with_plaintext_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    PLAINTEXT.with(|buf| f(&mut buf.borrow_mut()))
}

/// A sidecar's bytes and their parse. Immutable for the life of the file.
pub struct FileHeader {
    pub parsed: ParsedHeader,
    pub raw: Vec<u8>,
}

/// One object of the backing tree the kernel knows about.
pub struct Inode {
    kind: FileType,
    /// O_PATH handle on a backing directory: stays valid across renames.
    /// None for every other kind: holding one descriptor per file would run
    /// into the open-files limit (files are reached through `location`).
    fd: Option<OwnedFd>,
    /// Kernel lookup count; the entry is dropped when it reaches zero.
    lookups: AtomicU64,
    /// Last known (parent inode, name); None for the root, or once the name
    /// was unlinked. Needed to find the sidecar and for log lines.
    location: Mutex<Option<(u64, OsString)>>,
    /// Further names of a hard-linked file, so it stays reachable when the
    /// name in `location` is unlinked or renamed away.
    other_names: Mutex<Vec<(u64, OsString)>>,
    /// Shared open state while any handle is open (regular files).
    open_file: Mutex<Weak<CryptFile>>,
    /// The sidecar header, read at most once (headers never change).
    header: OnceLock<Arc<FileHeader>>,
    /// A regular file without sidecar under a non-mandatory policy: its
    /// bytes are plaintext and pass through unchanged.
    plain: bool,
    /// An O_PATH handle taken when the object's last name goes (unlink,
    /// rename over it) while the kernel still knows the inode. It keeps the
    /// backing inode number from being reused by a new object until the
    /// kernel forgets this one: inodes are keyed by that number, and a new
    /// directory must not be taken for the old file.
    pinned: Mutex<Option<OwnedFd>>,
    /// Set once the file's head went into the kernel's page cache at an open
    /// (`Core::fill_page_cache`); not again while the kernel knows the inode.
    /// The pages usually stay cached across opens (FOPEN_KEEP_CACHE); when
    /// the kernel drops them, READ requests serve the file as before.
    filled: AtomicBool,
}

impl Inode {
    /// Makes (parent, name) the name the inode is reached by, keeping the
    /// previous one as an alternative (hard links).
    fn note_name(&self, parent: u64, name: &OsStr) {
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
    fn drop_name(&self, parent: u64, name: &OsStr) {
        let mut loc = self.location.lock().unwrap();
        let mut others = self.other_names.lock().unwrap();
        others.retain(|(p, n)| !(*p == parent && n == name));
        if matches!(&*loc, Some((p, n)) if *p == parent && n == name) {
            *loc = others.pop();
        }
    }

    /// The O_PATH handle of a directory inode.
    fn raw_fd(&self) -> RawFd {
        self.fd
            .as_ref()
            .expect("directory inodes hold a handle")
            .as_raw_fd()
    }
}

/// How the backing object of an inode is reached (see `Core::reach`). Each
/// variant keeps what it refers to alive while it is used.
enum Reach {
    /// A directory, through its own O_PATH handle.
    Dir(Arc<Inode>),
    /// A file with open handles, through its open file (also after unlink).
    Open(Arc<CryptFile>),
    /// Anything else by name in its directory (final symlink not followed).
    At(Arc<Inode>, std::ffi::CString),
}

impl Reach {
    fn stat(&self) -> std::io::Result<libc::stat> {
        match self {
            Reach::Dir(d) => sys::fstat(d.raw_fd()),
            Reach::Open(cf) => sys::fstat(cf.file().as_raw_fd()),
            Reach::At(dir, name) => sys::fstatat(dir.raw_fd(), name),
        }
    }

    fn chown(&self, uid: u32, gid: u32) -> std::io::Result<()> {
        match self {
            Reach::Dir(d) => sys::fchownat(d.raw_fd(), uid, gid),
            Reach::Open(cf) => sys::fchownat(cf.file().as_raw_fd(), uid, gid),
            Reach::At(dir, name) => sys::lchownat(dir.raw_fd(), name, uid, gid),
        }
    }

    fn chmod(&self, mode: u32) -> std::io::Result<()> {
        match self {
            // fchmod refuses O_PATH handles.
            Reach::Dir(d) => sys::chmod_path(&sys::proc_path(&d.raw_fd()), mode),
            Reach::Open(cf) => sys::fchmod(cf.file().as_raw_fd(), mode),
            Reach::At(dir, name) => sys::fchmodat(dir.raw_fd(), name, mode),
        }
    }

    fn set_times(&self, times: &[libc::timespec; 2]) -> std::io::Result<()> {
        match self {
            Reach::Dir(d) => sys::utimensat(libc::AT_FDCWD, &sys::proc_path(&d.raw_fd()), times, 0),
            Reach::Open(cf) => sys::futimens(cf.file().as_raw_fd(), times),
            Reach::At(dir, name) => {
                sys::utimensat(dir.raw_fd(), name, times, libc::AT_SYMLINK_NOFOLLOW)
            }
        }
    }

    /// A path for the *xattr calls, and whether they may follow it.
    fn xattr_path(&self) -> (std::ffi::CString, bool) {
        match self {
            Reach::Dir(d) => (sys::proc_path(&d.raw_fd()), true),
            Reach::Open(cf) => (sys::proc_path(&cf.file().as_raw_fd()), true),
            Reach::At(dir, name) => {
                let mut p = format!("/proc/self/fd/{}/", dir.raw_fd()).into_bytes();
                p.extend_from_slice(name.as_bytes());
                (std::ffi::CString::new(p).expect("no NUL"), false)
            }
        }
    }
}

/// A directory listing: (fuse ino, kind, name).
type DirEntries = Vec<(u64, FileType, OsString)>;

/// An open file or directory handle.
enum Handle {
    File(Arc<CryptFile>),
    /// Directory snapshot taken at opendir.
    Dir(Arc<DirEntries>),
}

/// Backing-directory state shared by all FUSE threads.
pub struct Core {
    /// O_PATH handle on the backing root.
    root: Arc<Inode>,
    /// Backing inode number of the root (FUSE calls it 1).
    root_backing_ino: u64,
    geometry: BlockGeometry,
    /// Key policies with their KMS connected; one has dir "/".
    policies: Vec<ActivePolicy>,
    /// True when some policy lets sidecar-less (plaintext) files through.
    has_optional_policy: bool,
    /// Everything that may unwrap an existing file's DEK.
    providers: ProviderSet,
    pub cache: DekCache,
    runtime: KmsRuntime,
    metrics: Arc<Metrics>,
    read_only: bool,
    /// Invariant: holds every inode with a non-zero lookup count, plus root.
    inodes: RwLock<HashMap<u64, Arc<Inode>>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Directories whose DEKs were prefetched, and when.
    prefetched_dirs: Mutex<HashMap<u64, std::time::Instant>>,
    /// Closes descriptors of unlinked backing files off the request path.
    reaper: Worker,
    /// Reads sidecars ahead for the local keyring (`prefetch_siblings`).
    readahead: Worker,
    /// Puts plaintext at offset 0 of a FUSE inode into the kernel's page
    /// cache (FUSE_NOTIFY_STORE). Set by the FUSE adapter once mounted;
    /// unset where `Core` is driven without a kernel (then nothing is filled).
    page_filler: OnceLock<PageFiller>,
    is_root_user: bool,
}

fn kind_of(mode: u32) -> FileType {
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

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
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

fn errno(e: i32) -> FsError {
    FsError::errno(e)
}

fn reject_reserved(name: &OsStr) -> FsResult<()> {
    if is_reserved(name.as_bytes()) {
        return Err(errno(libc::EPERM));
    }
    Ok(())
}

/// Who asked: new objects are owned by them.
#[derive(Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Core {
    pub fn new(
        backing: &Path,
        config: &Config,
        connected: Connected,
        cache: DekCache,
        runtime: KmsRuntime,
        metrics: Arc<Metrics>,
        read_only: bool,
    ) -> std::io::Result<Self> {
        let c = sys::cstr(backing.as_os_str())?;
        let fd = sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let root = Arc::new(Inode {
            kind: FileType::Directory,
            fd: Some(fd),
            lookups: AtomicU64::new(1),
            location: Mutex::new(None),
            other_names: Mutex::new(Vec::new()),
            open_file: Mutex::new(Weak::new()),
            header: OnceLock::new(),
            filled: AtomicBool::new(false),
            plain: false,
            pinned: Mutex::new(None),
        });
        let mut inodes = HashMap::new();
        inodes.insert(ROOT_INO, root.clone());
        Ok(Core {
            root,
            root_backing_ino: st.st_ino,
            geometry: config.geometry(),
            has_optional_policy: connected.policies.iter().any(|p| !p.policy.mandatory),
            policies: connected.policies,
            providers: connected.providers,
            cache,
            runtime,
            metrics,
            read_only,
            inodes: RwLock::new(inodes),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            prefetched_dirs: Mutex::new(HashMap::new()),
            reaper: Worker::start("kmsfs-reaper", 1024),
            readahead: Worker::start("kmsfs-readahead", 64),
            page_filler: OnceLock::new(),
            is_root_user: unsafe { libc::geteuid() } == 0,
        })
    }

    /// Installs how file heads reach the kernel's page cache (see
    /// `fill_page_cache`); the first one installed stays.
    pub fn set_page_filler(&self, filler: PageFiller) {
        let _ = self.page_filler.set(filler);
    }

    pub fn runtime(&self) -> &KmsRuntime {
        &self.runtime
    }

    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.cache.stats)
    }

    /// FUSE inode number of a backing inode number (root is always 1).
    fn fuse_ino(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_backing_ino {
            ROOT_INO
        } else if backing_ino == ROOT_INO {
            self.root_backing_ino
        } else {
            backing_ino
        }
    }

    fn inode(&self, ino: u64) -> FsResult<Arc<Inode>> {
        self.inodes
            .read()
            .unwrap()
            .get(&ino)
            .cloned()
            .ok_or_else(|| errno(libc::ENOENT))
    }

    fn dir(&self, ino: u64) -> FsResult<Arc<Inode>> {
        let i = self.inode(ino)?;
        if i.kind != FileType::Directory {
            return Err(errno(libc::ENOTDIR));
        }
        Ok(i)
    }

    /// Mount-relative path ("/" or "/a/b") of an inode, from the names the
    /// kernel last looked it up by; None once unlinked.
    fn rel_path(&self, inode: &Inode) -> Option<String> {
        let mut parts = Vec::new();
        if std::ptr::eq(inode, &*self.root) {
            return Some("/".into());
        }
        let mut loc = inode.location.lock().unwrap().clone();
        while let Some((parent, name)) = loc {
            parts.push(name.to_string_lossy().into_owned());
            if parent == ROOT_INO {
                let mut path = String::new();
                for p in parts.iter().rev() {
                    path.push('/');
                    path.push_str(p);
                }
                return Some(path);
            }
            if parts.len() > 4096 {
                return None;
            }
            loc = self
                .inodes
                .read()
                .unwrap()
                .get(&parent)?
                .location
                .lock()
                .unwrap()
                .clone();
        }
        None
    }

    /// Backing-relative path of an inode, for log lines.
    fn label(&self, inode: &Inode) -> String {
        match self.rel_path(inode) {
            Some(p) => p.trim_start_matches('/').to_owned(),
            None => "(unlinked file)".into(),
        }
    }

    /// The policy governing mount-relative `path`.
    fn policy_at(&self, path: &str) -> &ActivePolicy {
        &self.policies[governing_by(self.policies.iter().map(|p| p.policy.dir.as_str()), path)]
    }

    /// The policy for new files in directory `dir`.
    fn policy_in(&self, dir: &Inode) -> FsResult<&ActivePolicy> {
        let path = self.rel_path(dir).ok_or_else(|| errno(libc::ENOENT))?;
        Ok(self.policy_at(&path))
    }

    fn attr(&self, st: &libc::stat, plain: bool) -> FileAttr {
        let kind = kind_of(st.st_mode);
        let size = if kind == FileType::RegularFile && !plain {
            self.geometry.plaintext_size(st.st_size as u64)
        } else {
            st.st_size as u64
        };
        FileAttr {
            ino: INodeNo(self.fuse_ino(st.st_ino)),
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

    /// Records that the kernel now knows `name` in `parent` (one lookup).
    fn remember(
        &self,
        parent: u64,
        name: &OsStr,
        fd: Option<OwnedFd>,
        st: &libc::stat,
        plain: bool,
    ) -> Arc<Inode> {
        let ino = self.fuse_ino(st.st_ino);
        let mut map = self.inodes.write().unwrap();
        if let Some(existing) = map.get(&ino) {
            existing.lookups.fetch_add(1, Ordering::Relaxed);
            if ino != ROOT_INO {
                existing.note_name(parent, name);
            }
            return existing.clone();
        }
        let inode = Arc::new(Inode {
            kind: kind_of(st.st_mode),
            fd,
            lookups: AtomicU64::new(1),
            location: Mutex::new(Some((parent, name.to_owned()))),
            other_names: Mutex::new(Vec::new()),
            open_file: Mutex::new(Weak::new()),
            header: OnceLock::new(),
            filled: AtomicBool::new(false),
            plain,
            pinned: Mutex::new(None),
        });
        map.insert(ino, inode.clone());
        inode
    }

    /// Opens `name` in `parent` as an inode the kernel now knows.
    fn lookup_in(
        &self,
        parent: u64,
        dir: &Inode,
        name: &OsStr,
    ) -> FsResult<(Arc<Inode>, FileAttr)> {
        let c = sys::cstr(name)?;
        let (fd, st) = self.stat_new(dir, &c)?;
        let plain = self.is_plain(dir, name, &st)?;
        let inode = self.remember(parent, name, fd, &st, plain);
        Ok((inode, self.attr(&st, plain)))
    }

    /// Stats `name` in `dir`; for a directory also opens the O_PATH handle
    /// its inode keeps.
    fn stat_new(&self, dir: &Inode, c: &std::ffi::CStr) -> FsResult<(Option<OwnedFd>, libc::stat)> {
        let st = sys::fstatat(dir.raw_fd(), c)?;
        if kind_of(st.st_mode) != FileType::Directory {
            return Ok((None, st));
        }
        let fd = sys::open_path(dir.raw_fd(), c)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        Ok((Some(fd), st))
    }

    /// Where an inode's backing object can be reached: a directory through
    /// its own handle, a file through its open file (which also works after
    /// unlink), anything else by its parent directory and name.
    fn reach(&self, inode: &Arc<Inode>) -> FsResult<Reach> {
        if inode.fd.is_some() {
            return Ok(Reach::Dir(inode.clone()));
        }
        if let Some(cf) = inode.open_file.lock().unwrap().upgrade() {
            return Ok(Reach::Open(cf));
        }
        let Some((parent, name)) = inode.location.lock().unwrap().clone() else {
            return Err(errno(libc::ENOENT));
        };
        Ok(Reach::At(self.dir(parent)?, sys::cstr(&name)?))
    }

    /// Whether `name` in `dir` is a plaintext file let through by a
    /// non-mandatory policy (costs a sidecar check only in such subtrees).
    fn is_plain(&self, dir: &Inode, name: &OsStr, st: &libc::stat) -> FsResult<bool> {
        if !self.has_optional_policy
            || kind_of(st.st_mode) != FileType::RegularFile
            || self.policy_in(dir)?.policy.mandatory
        {
            return Ok(false);
        }
        let sc = sys::cstr(OsStr::from_bytes(&sidecar_name(name.as_bytes())))?;
        Ok(sys::fstatat(dir.raw_fd(), &sc).is_err())
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<FileAttr> {
        if is_reserved(name.as_bytes()) {
            return Err(errno(libc::ENOENT));
        }
        let dir = self.dir(parent)?;
        self.lookup_in(parent, &dir, name).map(|(_, a)| a)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let gone = {
            let mut map = self.inodes.write().unwrap();
            match map.get(&ino) {
                Some(i) if i.lookups.fetch_sub(n, Ordering::Relaxed) <= n => map.remove(&ino),
                _ => None,
            }
        };
        // Not under the table lock, which every request takes: closing the
        // last handle on an unlinked file frees its blocks (rm -rf spent
        // most of its time waiting for the table while that happened).
        if let Some(inode) = gone {
            if let Some(fd) = inode.pinned.lock().unwrap().take() {
                self.reaper.close_later(fd);
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<FileAttr> {
        let inode = self.inode(ino)?;
        let st = self.reach(&inode)?.stat()?;
        Ok(self.attr(&st, inode.plain))
    }

    fn file_handle(&self, fh: u64) -> FsResult<Arc<CryptFile>> {
        match self.handles.read().unwrap().get(&fh).map(|h| &**h) {
            Some(Handle::File(f)) => Ok(f.clone()),
            _ => Err(errno(libc::EBADF)),
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().unwrap().insert(fh, Arc::new(h));
        fh
    }

    pub fn release(&self, fh: u64) {
        let gone = self.handles.write().unwrap().remove(&fh);
        // Closed outside the lock (see `forget`).
        drop(gone);
    }

    /// The sidecar header of a regular file, read once per inode.
    fn header_of(&self, inode: &Inode) -> FsResult<Arc<FileHeader>> {
        if let Some(h) = inode.header.get() {
            return Ok(h.clone());
        }
        let label = self.label(inode);
        let Some((parent, name)) = inode.location.lock().unwrap().clone() else {
            return Err(FsError::header(
                &label,
                "the file has no name left to find its sidecar by",
            ));
        };
        let dir = self.dir(parent)?;
        let raw = match read_sidecar(&dir, &name) {
            Ok(raw) => raw,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(FsError::header(
                    &label,
                    "sidecar is missing (not a kmsfs file, or its sidecar was deleted)",
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let parsed = hdr::parse(&raw).map_err(|e| FsError::header_format(&label, e))?;
        if parsed.header.geometry != self.geometry {
            return Err(FsError::header(
                &label,
                "its block size differs from this backing directory's configuration",
            ));
        }
        let fh = Arc::new(FileHeader { parsed, raw });
        Ok(inode.header.get_or_init(|| fh).clone())
    }

    /// Opens a regular file's backing data with `flags`.
    fn open_data(&self, inode: &Arc<Inode>, flags: i32) -> FsResult<OwnedFd> {
        Ok(match self.reach(inode)? {
            Reach::Open(cf) => sys::reopen(cf.file().as_raw_fd(), flags)?,
            Reach::At(dir, name) => sys::openat(dir.raw_fd(), &name, flags | libc::O_NOFOLLOW, 0)?,
            Reach::Dir(_) => return Err(errno(libc::EISDIR)),
        })
    }

    /// The shared open state of a regular file: header from the sidecar (once
    /// per inode), DEK from the cache or one KMS unwrap. With `fill` (the
    /// inode's FUSE number, for an open for reading), an open state made
    /// here also has the file's head put into the kernel's page cache.
    pub async fn crypt_file(
        &self,
        inode: &Arc<Inode>,
        fill: Option<u64>,
    ) -> FsResult<Arc<CryptFile>> {
        if let Some(cf) = inode.open_file.lock().unwrap().upgrade() {
            return Ok(cf);
        }
        if inode.kind != FileType::RegularFile {
            return Err(errno(libc::EINVAL));
        }
        let flags = if self.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        if inode.plain {
            let fd = self.open_data(inode, flags)?;
            let mut slot = inode.open_file.lock().unwrap();
            if let Some(cf) = slot.upgrade() {
                return Ok(cf);
            }
            let cf = Arc::new(CryptFile::plaintext(
                File::from(fd),
                self.geometry,
                self.label(inode),
            ));
            *slot = Arc::downgrade(&cf);
            return Ok(cf);
        }
        // Open the data first and start reading its head from disk, so that
        // read overlaps the sidecar read and the unwrap.
        let fd = self.open_data(inode, flags)?;
        sys::readahead(
            fd.as_raw_fd(),
            self.geometry.ciphertext_size(OPEN_FILL) as usize,
        );
        let header = self.header_of(inode)?;
        let h = &header.parsed.header;
        let label = self.label(inode);
        let ctx = WrapContext { file_id: h.file_id };
        let wrapped = WrappedDek {
            key_ref: h.key_ref.clone(),
            blob: h.wrapped_dek.clone(),
        };
        let kms_err = |source| FsError::Kms {
            file: label.clone(),
            action: "the DEK could not be unwrapped",
            source: Box::new(source),
        };
        let dek = match self.cache.get(&wrapped, &ctx) {
            Some(d) => d,
            None => {
                let provider = self.providers.for_key(&h.key_ref).map_err(kms_err)?;
                self.cache
                    .get_or_unwrap(&wrapped, &ctx, provider.as_ref())
                    .await
                    .map_err(kms_err)?
            }
        };
        crypto::verify_header(&header.parsed, &dek).map_err(|e| FsError::header(&label, e))?;
        let cipher = BlockCipher::new(&dek, h);
        let mut slot = inode.open_file.lock().unwrap();
        if let Some(cf) = slot.upgrade() {
            return Ok(cf);
        }
        let cf = Arc::new(CryptFile::new(
            File::from(fd),
            cipher,
            self.geometry,
            label,
            None,
        )?);
        *slot = Arc::downgrade(&cf);
        if let Some(ino) = fill {
            // Still under `slot`: see `fill_page_cache`.
            self.fill_page_cache(ino, inode, &cf);
        }
        Ok(cf)
    }

    /// Puts the first `OPEN_FILL` bytes of a file just opened for reading
    /// into the kernel's page cache, so that reading them makes no READ
    /// request: for a small file the READ's round trip costs more than its
    /// decryption. Once per inode while the kernel knows it.
    ///
    /// Called with the inode's `open_file` slot held, right after its open
    /// state was made: a store overwrites the kernel's pages, so none of them
    /// may be dirty. With no open state there is no open handle, and the
    /// kernel writes dirty pages back before a handle's release; while the
    /// slot is held no other open can hand out a handle to write through.
    ///
    /// Best effort: nothing is stored if a block fails authentication (the
    /// READ that follows reports it) or the kernel refuses. (After a failed
    /// writeback the kernel may still cache bytes that never reached the
    /// backing file; a store then replaces only the first `OPEN_FILL` of
    /// them. The failed write was reported with EIO.)
    fn fill_page_cache(&self, ino: u64, inode: &Inode, cf: &CryptFile) {
        let Some(store) = self.page_filler.get() else {
            return;
        };
        if inode.filled.load(Ordering::Relaxed) {
            return;
        }
        let len = match cf.size() {
            Ok(size) => size.min(OPEN_FILL) as usize,
            Err(_) => return,
        };
        if len == 0 {
            return;
        }
        with_plaintext_scratch(|buf| {
            if cf.read(0, len, buf).is_err() {
                return;
            }
            match store(ino, buf) {
                Ok(()) => {
                    inode.filled.store(true, Ordering::Relaxed);
                    self.metrics
                        .bytes_filled
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("page cache fill of inode {ino} refused: {e}"),
            }
        });
    }

    /// `reading_only`: opened O_RDONLY without O_TRUNC (only such opens fill
    /// the page cache).
    pub async fn open(&self, ino: u64, reading_only: bool) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        let cf = self.crypt_file(&inode, reading_only.then_some(ino)).await?;
        Ok(self.add_handle(Handle::File(cf)))
    }

    pub fn read(&self, fh: u64, offset: u64, size: usize, out: &mut Vec<u8>) -> FsResult<()> {
        self.file_handle(fh)?.read(offset, size, out)?;
        self.metrics
            .bytes_read
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// `kill_privileges`: the kernel flagged a writer without CAP_FSETID.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_privileges: bool) -> FsResult<()> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        let cf = self.file_handle(fh)?;
        if kill_privileges {
            cf.kill_privileges()?;
        }
        cf.write(offset, data)?;
        self.metrics
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        self.file_handle(fh)?.sync(datasync)
    }

    /// Owner of a new object: the caller, with the group inherited from a
    /// set-group-ID parent directory.
    fn chown_new(&self, parent: &Inode, name: &std::ffi::CStr, caller: Caller) -> FsResult<()> {
        if !self.is_root_user {
            return Ok(());
        }
        let pst = sys::fstat(parent.raw_fd())?;
        let setgid = pst.st_mode & libc::S_ISGID != 0;
        let gid = if setgid { pst.st_gid } else { caller.gid };
        // The daemon (root) created it as root, with the parent's group where
        // set-group-ID applies; chown only when that is not the answer.
        let created_gid = if setgid { pst.st_gid } else { 0 };
        if caller.uid != 0 || gid != created_gid {
            sys::lchownat(parent.raw_fd(), name, caller.uid, gid)?;
        }
        Ok(())
    }

    /// Creates a regular file with a fresh DEK; returns its open state.
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> FsResult<(FileAttr, Arc<CryptFile>)> {
        reject_reserved(name)?;
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        let dir = self.dir(parent)?;
        let dfd = dir.raw_fd();
        let c = sys::cstr(name)?;
        if name.len() > crate::format::names::NAME_MAX {
            return Err(errno(libc::ENAMETOOLONG));
        }
        if sys::fstatat(dfd, &c).is_ok() {
            // Checked before asking the KMS for a key that would go unused.
            return Err(errno(libc::EEXIST));
        }
        let policy = self.policy_in(&dir)?;
        let file_id = crypto::random_file_id();
        let ctx = WrapContext { file_id };
        let (dek, wrapped) =
            policy
                .provider
                .generate_dek(&ctx)
                .await
                .map_err(|source| FsError::Kms {
                    file: name.to_string_lossy().into_owned(),
                    action: "no DEK could be generated for the new file",
                    source: Box::new(source),
                })?;
        let header = Header {
            cipher: policy.policy.cipher,
            geometry: self.geometry,
            file_id,
            key_ref: wrapped.key_ref.clone(),
            wrapped_dek: wrapped.blob.clone(),
        };
        let raw = crypto::seal_header(&header, &dek)
            .map_err(|e| FsError::header(&name.to_string_lossy(), e))?;
        let sidecar = self.write_sidecar(dfd, name, &raw)?;
        let data = match sys::openat(
            dfd,
            &c,
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
            mode & 0o7777,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = self.remove_sidecar(dfd, name);
                return Err(e.into());
            }
        };
        self.chown_new(&dir, &c, caller)?;
        if mode & 0o7000 != 0 {
            // chown clears set-ID bits; put back what the caller asked for.
            sys::fchmod(data.as_raw_fd(), mode & 0o7777)?;
        }
        let st = sys::fstat(data.as_raw_fd())?;
        let inode = self.remember(parent, name, None, &st, false);
        let parsed =
            hdr::parse(&raw).map_err(|e| FsError::header_format(&name.to_string_lossy(), e))?;
        let _ = inode.header.set(Arc::new(FileHeader { parsed, raw }));
        let cipher = BlockCipher::new(&dek, &header);
        self.cache.insert(&wrapped, &ctx, Arc::new(dek));
        let cf = Arc::new(CryptFile::new(
            File::from(data),
            cipher,
            self.geometry,
            self.label(&inode),
            Some(PendingDurability {
                sidecar,
                parent_dir: dir.clone(),
            }),
        )?);
        *inode.open_file.lock().unwrap() = Arc::downgrade(&cf);
        Ok((self.attr(&st, false), cf))
    }

    pub async fn create_open(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> FsResult<(FileAttr, u64)> {
        let (attr, cf) = self.create(parent, name, mode, caller).await?;
        Ok((attr, self.add_handle(Handle::File(cf))))
    }

    /// Writes a new sidecar for `name` (O_EXCL). A leftover sidecar whose
    /// data file is gone (crash between the two unlinks) is replaced.
    fn write_sidecar(&self, dfd: i32, name: &OsStr, raw: &[u8]) -> FsResult<File> {
        let sc = sys::cstr(OsStr::from_bytes(&sidecar_name(name.as_bytes())))?;
        let c = sys::cstr(name)?;
        for _ in 0..2 {
            match sys::openat(
                dfd,
                &sc,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                0o600,
            ) {
                Ok(fd) => {
                    let mut f = File::from(fd);
                    if let Err(e) = f.write_all(raw) {
                        let _ = sys::unlinkat(dfd, &sc, 0);
                        return Err(e.into());
                    }
                    return Ok(f);
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => match sys::fstatat(dfd, &c) {
                    Ok(_) => return Err(errno(libc::EEXIST)),
                    Err(_) => sys::unlinkat(dfd, &sc, 0)?,
                },
                Err(e) => return Err(e.into()),
            }
        }
        Err(errno(libc::EEXIST))
    }

    /// Removes the sidecar of `name` if there is one. Its space is freed on
    /// the reaper thread (see `background`), not while the caller waits.
    fn remove_sidecar(&self, dfd: i32, name: &OsStr) -> FsResult<()> {
        let sc = sys::cstr(OsStr::from_bytes(&sidecar_name(name.as_bytes())))?;
        let held = sys::open_path(dfd, &sc).ok();
        match sys::unlinkat(dfd, &sc, 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e.into()),
            _ => {}
        }
        if let Some(fd) = held {
            self.reaper.close_later(fd);
        }
        Ok(())
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        reject_reserved(name)?;
        let dir = self.dir(parent)?;
        let c = sys::cstr(name)?;
        sys::mkdirat(dir.raw_fd(), &c, mode & 0o7777)?;
        self.finish_new(parent, &dir, name, caller, Some(mode))
    }

    /// Common tail of mkdir/mknod/symlink: chown, then look up.
    fn finish_new(
        &self,
        parent: u64,
        dir: &Inode,
        name: &OsStr,
        caller: Caller,
        mode: Option<u32>,
    ) -> FsResult<FileAttr> {
        let c = sys::cstr(name)?;
        self.chown_new(dir, &c, caller)?;
        if let Some(mode) = mode {
            if mode & 0o7000 != 0 && kind_of(mode) != FileType::Symlink {
                // chown clears set-ID bits; put back what the caller asked for.
                sys::fchmodat(dir.raw_fd(), &c, mode & 0o7777)?;
            }
        }
        let (fd, st) = self.stat_new(dir, &c)?;
        self.remember(parent, name, fd, &st, false);
        Ok(self.attr(&st, false))
    }

    pub async fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        reject_reserved(name)?;
        if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
            return self
                .create(parent, name, mode & 0o7777, caller)
                .await
                .map(|(a, _)| a);
        }
        let dir = self.dir(parent)?;
        let c = sys::cstr(name)?;
        sys::mknodat(dir.raw_fd(), &c, mode, rdev as u64)?;
        self.finish_new(parent, &dir, name, caller, Some(mode))
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        reject_reserved(name)?;
        let dir = self.dir(parent)?;
        let c = sys::cstr(name)?;
        let t = sys::cstr(target.as_os_str())?;
        sys::symlinkat(&t, dir.raw_fd(), &c)?;
        self.finish_new(parent, &dir, name, caller, None)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        match self.reach(&inode)? {
            Reach::At(dir, name) => Ok(sys::readlinkat(dir.raw_fd(), &name)?),
            Reach::Open(_) | Reach::Dir(_) => Err(errno(libc::EINVAL)),
        }
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        if is_reserved(name.as_bytes()) {
            return Err(errno(libc::ENOENT));
        }
        let dir = self.dir(parent)?;
        let dfd = dir.raw_fd();
        let c = sys::cstr(name)?;
        let st = sys::fstatat(dfd, &c)?;
        self.pin_if_last_name(&dir, &c, &st);
        sys::unlinkat(dfd, &c, 0)?;
        if kind_of(st.st_mode) == FileType::RegularFile {
            self.remove_sidecar(dfd, name)?;
        }
        self.forget_name(parent, name, &st);
        Ok(())
    }

    /// Before `name` in `dir` (with stat `st`) loses what may be its last
    /// link: if the kernel still knows that inode, pin the backing object
    /// (see `Inode::pinned`). Directories hold their handle anyway.
    fn pin_if_last_name(&self, dir: &Inode, name: &std::ffi::CStr, st: &libc::stat) {
        if kind_of(st.st_mode) == FileType::Directory || st.st_nlink > 1 {
            return;
        }
        let map = self.inodes.read().unwrap();
        let Some(inode) = map.get(&self.fuse_ino(st.st_ino)) else {
            return;
        };
        if let Ok(fd) = sys::open_path(dir.raw_fd(), name) {
            *inode.pinned.lock().unwrap() = Some(fd);
        }
    }

    /// After a name went away: the inode keeps working through its fd, but
    /// no longer has that name.
    fn forget_name(&self, parent: u64, name: &OsStr, st: &libc::stat) {
        if let Some(inode) = self.inodes.read().unwrap().get(&self.fuse_ino(st.st_ino)) {
            inode.drop_name(parent, name);
        }
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        if is_reserved(name.as_bytes()) {
            return Err(errno(libc::ENOENT));
        }
        let dir = self.dir(parent)?;
        let dfd = dir.raw_fd();
        let c = sys::cstr(name)?;
        let st = sys::fstatat(dfd, &c)?;
        match sys::unlinkat(dfd, &c, libc::AT_REMOVEDIR) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                // Empty to the user but holding leftover sidecars: remove them.
                let sub = sys::openat(
                    dfd,
                    &c,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                let entries: Vec<OsString> =
                    std::fs::read_dir(sys::proc_path(&sub).to_str().unwrap_or_default())?
                        .filter_map(|e| e.ok().map(|e| e.file_name()))
                        .collect();
                if entries.iter().any(|n| !is_reserved(n.as_bytes())) {
                    return Err(e.into());
                }
                for n in entries {
                    sys::unlinkat(sub.as_raw_fd(), &sys::cstr(&n)?, 0)?;
                }
                sys::unlinkat(dfd, &c, libc::AT_REMOVEDIR)?;
            }
            r => r?,
        }
        self.forget_name(parent, name, &st);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        if is_reserved(name.as_bytes()) {
            return Err(errno(libc::ENOENT));
        }
        reject_reserved(newname)?;
        let (od, nd) = (self.dir(parent)?, self.dir(newparent)?);
        let (ofd, nfd) = (od.raw_fd(), nd.raw_fd());
        let (oc, nc) = (sys::cstr(name)?, sys::cstr(newname)?);
        let src = sys::fstatat(ofd, &oc)?;
        let dst = sys::fstatat(nfd, &nc).ok();
        self.check_same_policy(&od, name, kind_of(src.st_mode), &nd, newname)?;
        if let Some(d) = dst.filter(|_| flags & libc::RENAME_EXCHANGE != 0) {
            self.check_same_policy(&nd, newname, kind_of(d.st_mode), &od, name)?;
        }
        if let Some(d) = dst.filter(|_| flags & libc::RENAME_EXCHANGE == 0) {
            self.pin_if_last_name(&nd, &nc, &d);
        }
        sys::renameat2(ofd, &oc, nfd, &nc, flags)?;
        // Data moved; now its sidecar follows (see docs/ARCHITECTURE.md on the
        // crash window between the two steps).
        let osc = sys::cstr(OsStr::from_bytes(&sidecar_name(name.as_bytes())))?;
        let nsc = sys::cstr(OsStr::from_bytes(&sidecar_name(newname.as_bytes())))?;
        let src_reg = kind_of(src.st_mode) == FileType::RegularFile;
        let dst_reg = dst
            .map(|d| kind_of(d.st_mode) == FileType::RegularFile)
            .unwrap_or(false);
        if flags & libc::RENAME_EXCHANGE != 0 {
            match (src_reg, dst_reg) {
                (true, true) => sys::renameat2(ofd, &osc, nfd, &nsc, libc::RENAME_EXCHANGE)?,
                (true, false) => sys::renameat2(ofd, &osc, nfd, &nsc, 0)?,
                (false, true) => sys::renameat2(nfd, &nsc, ofd, &osc, 0)?,
                (false, false) => {}
            }
        } else if src_reg {
            sys::renameat2(ofd, &osc, nfd, &nsc, 0)?;
        } else if dst_reg {
            self.remove_sidecar(nfd, newname)?;
        }
        // Update where the kernel's inodes now live.
        let map = self.inodes.read().unwrap();
        let src_inode = map.get(&self.fuse_ino(src.st_ino)).cloned();
        let dst_inode = dst.and_then(|d| map.get(&self.fuse_ino(d.st_ino)).cloned());
        drop(map);
        if let Some(d) = &dst_inode {
            d.drop_name(newparent, newname);
            if flags & libc::RENAME_EXCHANGE != 0 {
                d.note_name(parent, name);
            }
        }
        if let Some(s) = src_inode {
            s.drop_name(parent, name);
            s.note_name(newparent, newname);
            if let Some(cf) = s.open_file.lock().unwrap().upgrade() {
                cf.set_label(self.label(&s));
            }
        }
        Ok(())
    }

    /// Moving or linking an entry between subtrees protected by different
    /// keys fails with EXDEV (as fscrypt does), so tools fall back to a copy
    /// that is encrypted under the destination's key.
    fn check_same_policy(
        &self,
        od: &Inode,
        name: &OsStr,
        kind: FileType,
        nd: &Inode,
        newname: &OsStr,
    ) -> FsResult<()> {
        if self.policies.len() == 1 {
            return Ok(());
        }
        let (Some(op), Some(np)) = (self.rel_path(od), self.rel_path(nd)) else {
            return Err(errno(libc::ENOENT));
        };
        let join =
            |dir: &str, n: &OsStr| format!("{}/{}", dir.trim_end_matches('/'), n.to_string_lossy());
        let (src, dst) = if kind == FileType::Directory {
            let src = join(&op, name);
            // A policy rooted inside the moved tree would no longer match.
            if self
                .policies
                .iter()
                .any(|p| p.policy.dir != src && is_within(&p.policy.dir, &src))
            {
                return Err(errno(libc::EXDEV));
            }
            (self.policy_at(&src), self.policy_at(&join(&np, newname)))
        } else {
            (self.policy_at(&op), self.policy_at(&np))
        };
        if src.policy.same_protection(&dst.policy) {
            Ok(())
        } else {
            Err(errno(libc::EXDEV))
        }
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<FileAttr> {
        reject_reserved(newname)?;
        let inode = self.inode(ino)?;
        if inode.kind == FileType::Directory {
            return Err(errno(libc::EPERM));
        }
        let nd = self.dir(newparent)?;
        let nfd = nd.raw_fd();
        let nc = sys::cstr(newname)?;
        if let Some((parent, name)) = inode.location.lock().unwrap().clone() {
            let od = self.dir(parent)?;
            self.check_same_policy(&od, &name, inode.kind, &nd, newname)?;
        }
        if sys::fstatat(nfd, &nc).is_ok() {
            return Err(errno(libc::EEXIST));
        }
        let sidecar = if inode.kind == FileType::RegularFile && !inode.plain {
            let header = self.header_of(&inode)?;
            Some(self.write_sidecar(nfd, newname, &header.raw)?)
        } else {
            None
        };
        let linked = match self.reach(&inode)? {
            Reach::At(dir, name) => sys::linkat(dir.raw_fd(), &name, nfd, &nc, 0),
            // Open but unlinked: linkat of a file with no names fails anyway.
            Reach::Open(cf) => {
                sys::linkat(cf.file().as_raw_fd(), c"", nfd, &nc, libc::AT_EMPTY_PATH)
            }
            Reach::Dir(_) => return Err(errno(libc::EPERM)),
        };
        if let Err(e) = linked {
            if sidecar.is_some() {
                let _ = self.remove_sidecar(nfd, newname);
            }
            return Err(e.into());
        }
        let st = sys::fstatat(nfd, &nc)?;
        self.remember(newparent, newname, None, &st, inode.plain);
        Ok(self.attr(&st, inode.plain))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<u64>,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        let inode = self.inode(ino)?;
        if self.read_only && (mode.is_some() || uid.is_some() || gid.is_some() || size.is_some()) {
            return Err(errno(libc::EROFS));
        }
        if mode.is_some() && inode.kind == FileType::Symlink {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let target = self.reach(&inode)?;
        if uid.is_some() || gid.is_some() {
            target.chown(uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if let Some(mode) = mode {
            target.chmod(mode & 0o7777)?;
        }
        if let Some(size) = size {
            match inode.kind {
                FileType::RegularFile => {}
                FileType::Directory => return Err(errno(libc::EISDIR)),
                _ => return Err(errno(libc::EINVAL)),
            }
            let cf = match fh.map(|fh| self.file_handle(fh)) {
                Some(Ok(cf)) => cf,
                _ => self.crypt_file(&inode, None).await?,
            };
            // The kernel leaves this to us (FUSE_HANDLE_KILLPRIV_V2) but does
            // not pass fuser its flag; root stands in for CAP_FSETID.
            if caller.uid != 0 {
                cf.kill_privileges()?;
            }
            cf.truncate(size)?;
        }
        if atime.is_some() || mtime.is_some() {
            target.set_times(&[timespec(atime), timespec(mtime)])?;
        }
        self.getattr(ino)
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let inode = self.dir(ino)?;
        let parent_ino = match &*inode.location.lock().unwrap() {
            Some((p, _)) => *p,
            None => ROOT_INO,
        };
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
            let ft = e.file_type()?;
            let kind = FileType::from_std(ft).unwrap_or(FileType::RegularFile);
            entries.push((self.fuse_ino(e.ino()), kind, name));
        }
        Ok(self.add_handle(Handle::Dir(Arc::new(entries))))
    }

    /// The snapshot behind an open directory handle.
    fn dir_entries(&self, fh: u64) -> FsResult<Arc<DirEntries>> {
        match self.handles.read().unwrap().get(&fh).map(|h| &**h) {
            Some(Handle::Dir(entries)) => Ok(entries.clone()),
            _ => Err(errno(libc::EBADF)),
        }
    }

    /// Entries of an open directory from `offset` on; `add` returns true when
    /// the reply is full.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> FsResult<()> {
        let entries = self.dir_entries(fh)?;
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
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, &OsStr, &FileAttr) -> bool,
    ) -> FsResult<()> {
        let entries = self.dir_entries(fh)?;
        let dir = self.dir(ino)?;
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

    /// Before the first cold open in a directory: readers working through
    /// a directory would otherwise wait for each sidecar's disk read, and
    /// with a remote KMS for each unwrap. With a remote KMS the directory's
    /// DEKs (at most as many as the cache holds) are unwrapped in batches,
    /// one KMS request per batch instead of one per file; with the local
    /// keyring only its sidecars are read ahead (the unwrap is cheap).
    /// Once per directory per cache lifetime. Listing a directory does not
    /// start it: `ls -lR` or `find` must not unwrap every DEK in the tree.
    pub fn prefetch_siblings(self: &Arc<Self>, ino: u64) {
        let Ok(inode) = self.inode(ino) else { return };
        if inode.kind != FileType::RegularFile
            || inode.plain
            || inode.open_file.lock().unwrap().upgrade().is_some()
        {
            return;
        }
        let remote = self.has_remote_kms();
        if remote {
            let Ok(header) = self.header_of(&inode) else {
                return;
            };
            let h = &header.parsed.header;
            let wrapped = WrappedDek {
                key_ref: h.key_ref.clone(),
                blob: h.wrapped_dek.clone(),
            };
            if self
                .cache
                .contains(&wrapped, &WrapContext { file_id: h.file_id })
            {
                return;
            }
        } else if inode.header.get().is_some() {
            return;
        }
        let Some((parent, own_name)) = inode.location.lock().unwrap().clone() else {
            return;
        };
        if !self.claim_prefetch(parent) {
            return;
        }
        let Ok(dir) = self.dir(parent) else { return };
        let cap = self.cache.capacity();
        if remote {
            // Listed here rather than on the prefetch thread: the batch then
            // goes out sooner, before the other readers' opens unwrap one by
            // one (measured: half the KMS requests). One getdents pass.
            let names = sibling_names(&dir, &own_name, cap);
            if names.is_empty() {
                return;
            }
            let core = self.clone();
            spawn_background(move || core.unwrap_in_batches(&dir, &names));
        } else {
            // Listed and read ahead on the readahead thread. Only a hint:
            // with its queue full this directory goes without, and a later
            // open may try again.
            let job =
                Box::new(move || read_sidecars_ahead(&dir, &sibling_names(&dir, &own_name, cap)));
            if self.readahead.try_queue(job).is_err() {
                self.prefetched_dirs.lock().unwrap().remove(&parent);
            }
        }
    }

    fn has_remote_kms(&self) -> bool {
        self.policies.iter().any(|p| p.provider.kind() != "local")
    }

    /// True for the first prefetch of directory `ino` within the DEK TTL.
    fn claim_prefetch(&self, ino: u64) -> bool {
        const PRUNE_AT: usize = 10_000;
        let mut seen = self.prefetched_dirs.lock().unwrap();
        let now = std::time::Instant::now();
        let ttl = self.cache.ttl();
        if seen.get(&ino).is_some_and(|t| now.duration_since(*t) < ttl) {
            return false;
        }
        if seen.len() >= PRUNE_AT {
            seen.retain(|_, t| now.duration_since(*t) < ttl);
        }
        seen.insert(ino, now);
        true
    }

    /// Reads the sidecars of `names` in `dir` and unwraps their DEKs into the
    /// cache, in batches per remote provider, each sent as soon as it is
    /// full. Runs on a prefetch thread: the sidecar reads block. An open
    /// racing a batch unwraps its own DEK rather than wait for the batch:
    /// making opens wait for 240-DEK batches (tried) cut KMS requests by half
    /// but slowed a cold Vault read to 0.58x of the local keyring.
    fn unwrap_in_batches(&self, dir: &Inode, names: &[OsString]) {
        const BATCH: usize = 240;
        let mut groups: Vec<(Arc<dyn KeyProvider>, Vec<UnwrapItem>)> = Vec::new();
        let send = |provider: &Arc<dyn KeyProvider>, items: Vec<UnwrapItem>| {
            let deks = self.runtime.block_on(provider.unwrap_many(&items));
            for (item, dek) in items.iter().zip(deks) {
                // Failures are left to the open, which reports them.
                if let Ok(dek) = dek {
                    self.cache.insert(&item.0, &item.1, Arc::new(dek));
                }
            }
        };
        for name in names {
            let Ok(raw) = read_sidecar(dir, name) else {
                continue;
            };
            let Ok(parsed) = hdr::parse(&raw) else {
                continue;
            };
            let h = parsed.header;
            let Ok(provider) = self.providers.for_key(&h.key_ref) else {
                continue;
            };
            if provider.kind() == "local" {
                continue;
            }
            let item = (
                WrappedDek {
                    key_ref: h.key_ref,
                    blob: h.wrapped_dek,
                },
                WrapContext { file_id: h.file_id },
            );
            if self.cache.contains(&item.0, &item.1) {
                continue;
            }
            let i = match groups.iter().position(|(p, _)| Arc::ptr_eq(p, &provider)) {
                Some(i) => i,
                None => {
                    groups.push((provider, Vec::new()));
                    groups.len() - 1
                }
            };
            let (p, items) = &mut groups[i];
            items.push(item);
            if items.len() == BATCH {
                send(p, std::mem::take(items));
            }
        }
        for (provider, items) in groups {
            if !items.is_empty() {
                send(&provider, items);
            }
        }
    }

    pub fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        let inode = self.dir(ino)?;
        File::from(sys::reopen(
            inode.raw_fd(),
            libc::O_RDONLY | libc::O_DIRECTORY,
        )?)
        .sync_all()?;
        Ok(())
    }

    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        Ok(sys::fstatvfs(
            sys::reopen(self.root.raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?.as_raw_fd(),
        )?)
    }

    /// A path to reach an inode's xattrs, whether the final name may be
    /// followed, and what keeps that path valid while it is used.
    fn xattr_path(&self, ino: u64) -> FsResult<(std::ffi::CString, bool, Reach)> {
        let reach = self.reach(&self.inode(ino)?)?;
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

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        if mode != 0 {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let cf = self.file_handle(fh)?;
        let end = offset + length;
        if end > cf.size()? {
            cf.truncate(end)?;
        }
        Ok(())
    }
}

/// The bytes of the sidecar of `name` in directory `dir` (at most
/// `MAX_SIDECAR_LEN`: anything larger is not one of ours).
fn read_sidecar(dir: &Inode, name: &OsStr) -> std::io::Result<Vec<u8>> {
    let sc = sys::cstr(OsStr::from_bytes(&sidecar_name(name.as_bytes())))?;
    let fd = sys::openat(dir.raw_fd(), &sc, SIDECAR_READ_FLAGS, 0)?;
    // Headers are a few hundred bytes: one read usually gets it all.
    let mut raw = Vec::with_capacity(1024);
    File::from(fd).take(MAX_SIDECAR_LEN).read_to_end(&mut raw)?;
    Ok(raw)
}

/// Names of up to `cap` regular files in `dir` other than `own_name` (the
/// file being opened reads its own sidecar); empty if it cannot be listed.
fn sibling_names(dir: &Inode, own_name: &OsStr, cap: usize) -> Vec<OsString> {
    let path = sys::proc_path(&dir.raw_fd());
    let Ok(rd) = std::fs::read_dir(OsStr::from_bytes(path.as_bytes())) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            e.file_type().is_ok_and(|t| t.is_file())
                && !is_reserved(e.file_name().as_bytes())
                && e.file_name() != own_name
        })
        .map(|e| e.file_name())
        .take(cap)
        .collect()
}

/// Starts reading the sidecars of `names` into the page cache (readahead
/// does not wait for the disk).
fn read_sidecars_ahead(dir: &Inode, names: &[OsString]) {
    for name in names {
        let Ok(sc) = sys::cstr(OsStr::from_bytes(&sidecar_name(name.as_bytes()))) else {
            continue;
        };
        if let Ok(fd) = sys::openat(dir.raw_fd(), &sc, SIDECAR_READ_FLAGS, 0) {
            sys::readahead(fd.as_raw_fd(), MAX_SIDECAR_LEN as usize);
        }
    }
}

/// Runs DEK prefetch on its own short-lived thread, off the FUSE workers
/// and the KMS runtime (it reads sidecars and waits for the KMS); one
/// thread per directory, so that one directory's batches do not wait for
/// another's.
fn spawn_background(work: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new()
        .name("kmsfs-prefetch".into())
        .spawn(work)
    {
        tracing::debug!("no prefetch thread: {e}");
    }
}

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
        Err(errno(refused))
    }
}

/// An extended-attribute request, for `XattrClass::allows`.
#[derive(Debug, Clone, Copy)]
enum XattrOp {
    Get,
    Set,
    Remove,
}
