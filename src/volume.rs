//! kmsfs without FUSE: a backing directory opened as a library, its files
//! listed, read and written by path.
//!
//! A [`Volume`] drives the very [`Core`](crate::fs::Core) a mount serves
//! requests with: the same lookups, headers, DEK cache, policies, KMS
//! providers and checks, with this process in the kernel's place. What it
//! writes, a mount reads, and the reverse.
//!
//! Paths are inside the volume and absolute, like `/d/e/x` (as for
//! policies). No symlink is followed: a path whose directory part goes
//! through a symlink fails with "not a directory", and [`Volume::metadata`]
//! describes a symlink itself. Access is checked by the backing
//! directory's own permissions for this process's user.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use kmsfs::Volume;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The trusted configuration from $KMSFS_CONFIG or /etc/kmsfs/kmsfs.toml.
//! let volume = Volume::open("/srv/kmsfs/backing")?;
//! volume.create_dir_all("/reports")?;
//! let mut file = volume.create("/reports/q3.txt")?;
//! file.write_all(b"plaintext in, ciphertext on disk")?;
//! file.close()?;
//!
//! let mut text = String::new();
//! volume.open_file("/reports/q3.txt")?.read_to_string(&mut text)?;
//! for entry in volume.read_dir("/reports")? {
//!     println!("{} {} bytes", entry.name.to_string_lossy(), entry.metadata.size);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The calls block; do not make them from inside an async runtime's worker.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{FileAttr, TimeOrNow};

use crate::audit::AuditLog;
use crate::cache::DekCache;
use crate::config::{self, Calls, ConfigError, TrustedConfig, TrustedError};
use crate::fs::error::{FsError, FsResult};
use crate::fs::{Caller, Core, SetAttr};
use crate::metrics::Metrics;

/// How a volume is opened; [`Options::default`] is what `kmsfs mount` uses.
#[derive(Clone)]
pub struct Options {
    /// The trusted configuration (default: `$KMSFS_CONFIG`, else
    /// `/etc/kmsfs/kmsfs.toml`).
    pub config: Option<PathBuf>,
    /// Refuse every change (EROFS), as `-o ro`.
    pub read_only: bool,
    /// DEK cache capacity, in entries.
    pub cache_capacity: usize,
    /// How long an unwrapped DEK stays cached.
    pub cache_ttl: Duration,
    /// Log every key operation as a JSON line here (default: the trusted
    /// configuration's `audit_log`, if set).
    pub audit_log: Option<PathBuf>,
    /// Pre-wrapped DEKs kept per remote KMS key, so that creates make no
    /// KMS call (as the mount's `dek_pool`). Default 0: a short-lived
    /// volume would wrap DEKs it never uses; a long-lived one that creates
    /// many files can set e.g. 512.
    pub dek_pool: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config: None,
            read_only: false,
            cache_capacity: 100_000,
            cache_ttl: Duration::from_secs(3600),
            audit_log: None,
            dek_pool: 0,
        }
    }
}

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Trusted(#[from] TrustedError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// `path` is not a path inside the volume (relative, or with `..`).
    #[error("{}: {reason}", path.display())]
    Path { path: PathBuf, reason: &'static str },
    /// An operation on `path` failed as it would through a mount. The
    /// message has the filesystem's reason in it (so it is no `source`).
    #[error("{}", describe(path, error))]
    Fs { path: PathBuf, error: FsError },
}

/// "path: reason", unless the reason names the file already.
fn describe(path: &Path, e: &FsError) -> String {
    match e {
        FsError::Io(_) | FsError::Errno(_) => format!("{}: {e}", path.display()),
        _ => e.to_string(),
    }
}

impl VolumeError {
    /// Whether trying again later may succeed (a KMS unreachable or slow).
    pub fn is_retryable(&self) -> bool {
        match self {
            VolumeError::Config(e) => e.is_retryable(),
            VolumeError::Fs { error, .. } => error.is_retryable(),
            _ => false,
        }
    }

    /// The errno a program reading through a mount would have got, if the
    /// operation reached the filesystem.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VolumeError::Fs { error, .. } => Some(error.to_errno()),
            VolumeError::Path { .. } => Some(libc::EINVAL),
            _ => None,
        }
    }

    fn fs(path: &Path, error: FsError) -> Self {
        VolumeError::Fs {
            path: path.to_owned(),
            error,
        }
    }
}

impl From<VolumeError> for io::Error {
    fn from(e: VolumeError) -> io::Error {
        match e.errno() {
            // The errno's kind, with the full message (file, block, what to do).
            Some(errno) => io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                ErrnoMessage { errno, e },
            ),
            None => io::Error::other(e),
        }
    }
}

/// A [`VolumeError`] inside an `io::Error` that keeps its errno.
#[derive(Debug)]
struct ErrnoMessage {
    errno: i32,
    e: VolumeError,
}

impl std::fmt::Display for ErrnoMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.e.fmt(f)
    }
}

impl std::error::Error for ErrnoMessage {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.e)
    }
}

/// The errno behind an `io::Error` made from a [`VolumeError`] (or any
/// OS error).
pub fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<ErrnoMessage>())
            .map(|m| m.errno)
    })
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// What kind of object an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl From<fuser::FileType> for FileKind {
    fn from(t: fuser::FileType) -> Self {
        use fuser::FileType as T;
        match t {
            T::RegularFile => FileKind::File,
            T::Directory => FileKind::Dir,
            T::Symlink => FileKind::Symlink,
            T::NamedPipe => FileKind::Fifo,
            T::Socket => FileKind::Socket,
            T::CharDevice => FileKind::CharDevice,
            T::BlockDevice => FileKind::BlockDevice,
        }
    }
}

/// An entry's attributes as a mount shows them (the plaintext size).
#[derive(Debug, Clone)]
pub struct Metadata {
    pub kind: FileKind,
    /// Plaintext size for a file; the target's length for a symlink.
    pub size: u64,
    /// Permission bits with set-ID and sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Device number of a device node.
    pub rdev: u32,
    /// The inode number a mount shows (hard links share it).
    pub ino: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl From<&FileAttr> for Metadata {
    fn from(a: &FileAttr) -> Self {
        Metadata {
            kind: a.kind.into(),
            size: a.size,
            mode: u32::from(a.perm),
            uid: a.uid,
            gid: a.gid,
            nlink: a.nlink,
            rdev: a.rdev,
            ino: a.ino.0,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
        }
    }
}

impl Metadata {
    pub fn is_dir(&self) -> bool {
        self.kind == FileKind::Dir
    }
    pub fn is_file(&self) -> bool {
        self.kind == FileKind::File
    }
    pub fn is_symlink(&self) -> bool {
        self.kind == FileKind::Symlink
    }
}

/// One entry of [`Volume::read_dir`].
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: OsString,
    /// The entry's path inside the volume.
    pub path: PathBuf,
    pub metadata: Metadata,
}

/// An opened kmsfs volume; see the [module documentation](self).
pub struct Volume {
    core: Arc<Core>,
    backing: PathBuf,
    caller: Caller,
}

/// FUSE's inode number of the volume's root directory.
const ROOT: u64 = 1;

/// Inodes looked up along a path, each counted once in the inode table
/// (as the kernel counts a lookup) and forgotten again when dropped, so
/// that the table does not grow with every path used.
struct Lookups {
    core: Arc<Core>,
    inos: Vec<u64>,
}

impl Lookups {
    /// The inode the path leads to (the root for "/").
    fn last(&self) -> u64 {
        self.inos.last().copied().unwrap_or(ROOT)
    }
}

impl Drop for Lookups {
    fn drop(&mut self) {
        for &ino in self.inos.iter().rev() {
            self.core.forget(ino, 1);
        }
    }
}

impl Volume {
    /// Opens backing directory `backing` with the default trusted
    /// configuration and [`Options::default`]. Reads the volume's
    /// configuration, connects its keys through the trusted configuration
    /// and checks the configuration's MAC, as `kmsfs mount` does.
    pub fn open(backing: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(backing, &Options::default())
    }

    /// [`open`](Self::open) with `options`.
    pub fn open_with(backing: impl AsRef<Path>, options: &Options) -> Result<Self> {
        let backing = std::path::absolute(backing.as_ref())
            .map_err(|e| VolumeError::fs(backing.as_ref(), e.into()))?;
        // The volume first: "not a backing directory" is the likelier mistake.
        config::VolumeConfig::load(&backing)?;
        let trusted = TrustedConfig::load(&TrustedConfig::locate(options.config.as_deref()))?;
        let metrics = Arc::new(Metrics::default());
        let (volume, runtime) =
            config::open_volume(&backing, &trusted, &Calls::Mount(metrics.clone()))?;
        let audit = match options.audit_log.as_deref() {
            Some(path) => Some(path.to_owned()),
            None => trusted.audit_log().map(Path::to_path_buf),
        };
        let cache = DekCache::new(options.cache_capacity, options.cache_ttl);
        let core = Core::new(
            &backing,
            &volume.config,
            volume.policies.clone(),
            cache,
            runtime,
            metrics,
            options.read_only,
        )
        .map_err(|e| VolumeError::fs(&backing, e.into()))?;
        if let Some(path) = audit {
            let audit = Arc::new(AuditLog::open(&path)?);
            volume.set_audit_log(audit.clone());
            core.set_audit_log(audit);
        }
        core.set_dek_pool(options.dek_pool);
        // SAFETY: these calls have no preconditions.
        let caller = unsafe {
            Caller {
                uid: libc::geteuid(),
                gid: libc::getegid(),
                pid: libc::getpid() as u32,
            }
        };
        Ok(Volume {
            core: Arc::new(core),
            backing,
            caller,
        })
    }

    /// The backing directory.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Runs async `Core` work to completion on the KMS runtime.
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.core.runtime().block_on(f)
    }

    /// Runs `op` on the inode `path` leads to, with errors naming `path`.
    fn at<T>(&self, path: &Path, op: impl FnOnce(u64) -> FsResult<T>) -> Result<T> {
        let at = self.resolve(path)?;
        op(at.last()).map_err(|e| VolumeError::fs(path, e))
    }

    /// Looks up every component of `path`.
    fn resolve(&self, path: &Path) -> Result<Lookups> {
        self.look_up(path, &components(path)?)
    }

    /// Looks up the directory part of `path`; returns it with the last name.
    fn resolve_parent<'p>(&self, path: &'p Path) -> Result<(Lookups, &'p OsStr)> {
        let names = components(path)?;
        let Some((last, dirs)) = names.split_last() else {
            return Err(VolumeError::Path {
                path: path.to_owned(),
                reason: "the volume's root directory has no name to create, link or remove",
            });
        };
        Ok((self.look_up(path, dirs)?, last))
    }

    /// Looks up `names` (of `path`) one after the other from the root.
    fn look_up(&self, path: &Path, names: &[&OsStr]) -> Result<Lookups> {
        let mut lookups = Lookups {
            core: self.core.clone(),
            inos: Vec::with_capacity(names.len()),
        };
        for name in names {
            let attr = self
                .core
                .lookup(lookups.last(), name)
                .map_err(|e| VolumeError::fs(path, e))?;
            lookups.inos.push(attr.ino.0);
        }
        Ok(lookups)
    }

    /// The attributes of `path` (a symlink's own).
    pub fn metadata(&self, path: impl AsRef<Path>) -> Result<Metadata> {
        let path = path.as_ref();
        self.at(path, |ino| {
            self.core.getattr(ino).map(|a| Metadata::from(&a))
        })
    }

    /// Whether `path` names an entry (errors other than "no such entry"
    /// are reported).
    pub fn exists(&self, path: impl AsRef<Path>) -> Result<bool> {
        let path = path.as_ref();
        match self.metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The entries of directory `path` with their attributes, without `.`
    /// and `..`, in the order the backing directory lists them.
    pub fn read_dir(&self, path: impl AsRef<Path>) -> Result<Vec<DirEntry>> {
        let path = path.as_ref();
        let at = self.resolve(path)?;
        let dir = at.last();
        let fs_err = |e| VolumeError::fs(path, e);
        let fh = self.core.opendir(dir).map_err(fs_err)?;
        let mut found = Vec::new();
        let listed = self.core.readdirplus(dir, fh, 0, |ino, _, name, attr| {
            if name != "." && name != ".." {
                found.push((ino, name.to_owned(), Metadata::from(attr)));
            }
            false
        });
        self.core.releasedir(fh);
        let mut entries = Vec::with_capacity(found.len());
        for (ino, name, metadata) in found {
            // readdirplus counted a lookup for each entry.
            self.core.forget(ino, 1);
            entries.push(DirEntry {
                path: path.join(&name),
                name,
                metadata,
            });
        }
        listed.map_err(fs_err)?;
        Ok(entries)
    }

    /// Every entry below directory `path`, depth first, each directory
    /// before its contents; `path` itself is not included.
    pub fn walk(&self, path: impl AsRef<Path>) -> Walk<'_> {
        let path = path.as_ref();
        Walk {
            volume: self,
            pending: vec![path.to_owned()],
            ready: Vec::new(),
        }
    }

    /// Opens file `path` for reading.
    pub fn open_file(&self, path: impl AsRef<Path>) -> Result<File> {
        let path = path.as_ref();
        self.open_handle(path, true)
    }

    /// Opens existing file `path` for reading and writing, at offset 0.
    pub fn open_rw(&self, path: impl AsRef<Path>) -> Result<File> {
        let path = path.as_ref();
        self.open_handle(path, false)
    }

    fn open_handle(&self, path: &Path, reading_only: bool) -> Result<File> {
        let at = self.resolve(path)?;
        let fs_err = |e| VolumeError::fs(path, e);
        let attr = self.core.getattr(at.last()).map_err(fs_err)?;
        // What open(2) says where the kernel would stop before the mount
        // is asked: a directory is no file, and no symlink is followed.
        match FileKind::from(attr.kind) {
            FileKind::Dir => return Err(fs_err(FsError::errno(libc::EISDIR))),
            FileKind::Symlink => return Err(fs_err(FsError::errno(libc::ELOOP))),
            _ => {}
        }
        let fh = self
            .block_on(self.core.open(at.last(), reading_only, self.caller))
            .map_err(fs_err)?;
        Ok(File::new(self, at, fh, path, attr.size))
    }

    /// Creates file `path` (mode 0644 before the umask), or empties it if it
    /// exists, and opens it for writing: a new file gets a fresh DEK and
    /// header under the policy of its directory, as in a mount.
    pub fn create(&self, path: impl AsRef<Path>) -> Result<File> {
        let path = path.as_ref();
        self.create_with_mode(path, 0o644 & !current_umask())
    }

    /// [`create`](Self::create) with permission bits `mode` (no umask).
    pub fn create_with_mode(&self, path: impl AsRef<Path>, mode: u32) -> Result<File> {
        let path = path.as_ref();
        let (dir, name) = self.resolve_parent(path)?;
        let created =
            self.block_on(
                self.core
                    .create_open(dir.last(), name, mode & 0o7777, self.caller),
            );
        match created {
            Ok((attr, fh)) => {
                let mut at = dir;
                at.inos.push(attr.ino.0);
                Ok(File::new(self, at, fh, path, 0))
            }
            Err(e) if e.to_errno() == libc::EEXIST => {
                drop(dir);
                let file = self.open_rw(path)?;
                file.set_len(0)?;
                Ok(file)
            }
            Err(e) => Err(VolumeError::fs(path, e)),
        }
    }

    /// Reads all of file `path`.
    pub fn read(&self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let mut file = self.open_file(path)?;
        // Sized by the length at open, in one call (its blocks decrypted
        // in parallel); a file that grew meanwhile is read to its end.
        let mut out = vec![0; file.size as usize];
        let mut filled = 0;
        loop {
            if filled == out.len() {
                out.resize(filled + (filled / 2).max(64 * 1024), 0);
            }
            let n = file.read_at(&mut out[filled..], filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        out.truncate(filled);
        Ok(out)
    }

    /// Writes `data` as the whole of file `path` (created if needed) and
    /// makes it durable.
    pub fn write(&self, path: impl AsRef<Path>, data: &[u8]) -> Result<()> {
        let path = path.as_ref();
        let mut file = self.create(path)?;
        file.write_all_at(data, 0)?;
        file.sync_all()?;
        file.close()
    }

    /// Creates directory `path` with permission bits `mode` (no umask).
    pub fn create_dir(&self, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let path = path.as_ref();
        let (dir, name) = self.resolve_parent(path)?;
        let attr = self
            .core
            .mkdir(dir.last(), name, mode, self.caller)
            .map_err(|e| VolumeError::fs(path, e))?;
        self.core.forget(attr.ino.0, 1);
        Ok(())
    }

    /// Creates directory `path` and any missing parents (mode 0755 before
    /// the umask); an existing directory is fine.
    pub fn create_dir_all(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mode = 0o755 & !current_umask();
        let mut sofar = PathBuf::from("/");
        for name in components(path)? {
            sofar.push(name);
            match self.create_dir(&sofar, mode) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::EEXIST) => {
                    if !self.metadata(&sofar)?.is_dir() {
                        return Err(VolumeError::fs(&sofar, FsError::errno(libc::ENOTDIR)));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes file, symlink or other non-directory `path`.
    pub fn remove_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let (dir, name) = self.resolve_parent(path)?;
        self.core
            .unlink(dir.last(), name)
            .map_err(|e| VolumeError::fs(path, e))
    }

    /// Removes empty directory `path`.
    pub fn remove_dir(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let (dir, name) = self.resolve_parent(path)?;
        self.core
            .rmdir(dir.last(), name)
            .map_err(|e| VolumeError::fs(path, e))
    }

    /// Renames `from` to `to`, replacing what `to` names (as rename(2)).
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
        let (from, to) = (from.as_ref(), to.as_ref());
        let (src_dir, src_name) = self.resolve_parent(from)?;
        let (dst_dir, dst_name) = self.resolve_parent(to)?;
        self.core
            .rename(src_dir.last(), src_name, dst_dir.last(), dst_name, 0)
            .map_err(|e| VolumeError::fs(from, e))
    }

    /// Makes `link` a new name of file `original` (a hard link).
    pub fn hard_link(&self, original: impl AsRef<Path>, link: impl AsRef<Path>) -> Result<()> {
        let (original, link) = (original.as_ref(), link.as_ref());
        let target = self.resolve(original)?;
        let (dir, name) = self.resolve_parent(link)?;
        let attr = self
            .core
            .link(target.last(), dir.last(), name)
            .map_err(|e| VolumeError::fs(link, e))?;
        self.core.forget(attr.ino.0, 1);
        Ok(())
    }

    /// Creates symlink `link` pointing at `target` (stored as it is; not
    /// encrypted, like a directory entry's name).
    pub fn symlink(&self, target: impl AsRef<Path>, link: impl AsRef<Path>) -> Result<()> {
        let link = link.as_ref();
        let (dir, name) = self.resolve_parent(link)?;
        let attr = self
            .core
            .symlink(dir.last(), name, target.as_ref(), self.caller)
            .map_err(|e| VolumeError::fs(link, e))?;
        self.core.forget(attr.ino.0, 1);
        Ok(())
    }

    /// Creates a FIFO, socket or device node `path` (`mode` has the type
    /// bits, as mknod(2); devices need root). A regular file is created
    /// encrypted, as by [`create_with_mode`](Self::create_with_mode).
    pub fn make_node(&self, path: impl AsRef<Path>, mode: u32, rdev: u32) -> Result<()> {
        let path = path.as_ref();
        let (dir, name) = self.resolve_parent(path)?;
        let attr = self
            .block_on(self.core.mknod(dir.last(), name, mode, rdev, self.caller))
            .map_err(|e| VolumeError::fs(path, e))?;
        self.core.forget(attr.ino.0, 1);
        Ok(())
    }

    /// The target of symlink `path`.
    pub fn read_link(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let target = self.at(path, |ino| self.core.readlink(ino))?;
        Ok(PathBuf::from(OsString::from_vec(target)))
    }

    /// Changes what `set` names of `path` (mode, owner, size, times).
    fn set_attr(&self, path: &Path, set: SetAttr) -> Result<()> {
        self.at(path, |ino| {
            self.block_on(self.core.setattr(ino, set, self.caller))
                .map(drop)
        })
    }

    /// Sets the permission bits of `path` (not of a symlink).
    pub fn set_permissions(&self, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let path = path.as_ref();
        self.set_attr(
            path,
            SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            },
        )
    }

    /// Changes the owner and/or group of `path` (a symlink's own).
    pub fn set_owner(
        &self, path: impl AsRef<Path>, uid: Option<u32>, gid: Option<u32>,
    ) -> Result<()> {
        let path = path.as_ref();
        self.set_attr(
            path,
            SetAttr {
                uid,
                gid,
                ..SetAttr::default()
            },
        )
    }

    /// Sets the access and modification times of `path` (a symlink's own).
    pub fn set_times(
        &self, path: impl AsRef<Path>, atime: SystemTime, mtime: SystemTime,
    ) -> Result<()> {
        let path = path.as_ref();
        self.set_attr(
            path,
            SetAttr {
                atime: Some(TimeOrNow::SpecificTime(atime)),
                mtime: Some(TimeOrNow::SpecificTime(mtime)),
                ..SetAttr::default()
            },
        )
    }

    /// Truncates or extends file `path` to `size` bytes.
    pub fn set_len(&self, path: impl AsRef<Path>, size: u64) -> Result<()> {
        let path = path.as_ref();
        self.set_attr(
            path,
            SetAttr {
                size: Some(size),
                ..SetAttr::default()
            },
        )
    }

    /// The names of the extended attributes of `path` (kept in the clear on
    /// the backing files, as in a mount).
    pub fn list_xattr(&self, path: impl AsRef<Path>) -> Result<Vec<OsString>> {
        let path = path.as_ref();
        let raw = self.at(path, |ino| self.core.listxattr(ino))?;
        Ok(raw
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| OsStr::from_bytes(n).to_owned())
            .collect())
    }

    /// The value of extended attribute `name` of `path`.
    pub fn get_xattr(&self, path: impl AsRef<Path>, name: impl AsRef<OsStr>) -> Result<Vec<u8>> {
        let path = path.as_ref();
        self.at(path, |ino| self.core.getxattr(ino, name.as_ref()))
    }

    /// Sets extended attribute `name` of `path` to `value`.
    pub fn set_xattr(
        &self, path: impl AsRef<Path>, name: impl AsRef<OsStr>, value: &[u8],
    ) -> Result<()> {
        let path = path.as_ref();
        self.at(path, |ino| self.core.setxattr(ino, name.as_ref(), value, 0))
    }
}

/// The names of absolute volume path `path`; "/" has none.
fn components(path: &Path) -> Result<Vec<&OsStr>> {
    use std::path::Component;
    let bad = |reason| VolumeError::Path {
        path: path.to_owned(),
        reason,
    };
    let mut parts = path.components();
    if parts.next() != Some(Component::RootDir) {
        return Err(bad("a path inside the volume starts with / (like /d/e/x)"));
    }
    parts
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(bad("a path inside the volume may not contain ..")),
        })
        .collect()
}

/// This process's umask (read without changing it, as /proc shows it).
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Walks a directory tree; see [`Volume::walk`].
pub struct Walk<'v> {
    volume: &'v Volume,
    /// Directories still to list.
    pending: Vec<PathBuf>,
    /// Entries listed and not yet returned, in reverse.
    ready: Vec<DirEntry>,
}

impl Iterator for Walk<'_> {
    type Item = Result<DirEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.ready.pop() {
                if entry.metadata.is_dir() {
                    self.pending.push(entry.path.clone());
                }
                return Some(Ok(entry));
            }
            let dir = self.pending.pop()?;
            match self.volume.read_dir(&dir) {
                Ok(mut entries) => {
                    entries.sort_by(|a, b| b.name.cmp(&a.name));
                    self.ready = entries;
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// An open file of a [`Volume`]: `Read`, `Write` and `Seek` at a position
/// of its own, plus positional [`read_at`](File::read_at) and
/// [`write_at`](File::write_at). Large reads decrypt their blocks in
/// parallel. Closed when dropped; [`close`](File::close) reports errors.
pub struct File {
    core: Arc<Core>,
    path: PathBuf,
    at: Lookups,
    fh: u64,
    caller: Caller,
    pos: u64,
    /// The size when opened, kept up to date by this handle's writes; for
    /// `SeekFrom::End` and sizing whole reads.
    size: u64,
    scratch: Vec<u8>,
}

impl File {
    fn new(volume: &Volume, at: Lookups, fh: u64, path: &Path, size: u64) -> Self {
        File {
            core: volume.core.clone(),
            path: path.to_owned(),
            at,
            fh,
            caller: volume.caller,
            pos: 0,
            size,
            scratch: Vec::new(),
        }
    }

    fn err(&self, e: FsError) -> VolumeError {
        VolumeError::fs(&self.path, e)
    }

    /// The file's plaintext size now.
    pub fn len(&self) -> Result<u64> {
        self.core
            .getattr(self.at.last())
            .map(|a| a.size)
            .map_err(|e| self.err(e))
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The attributes of the open file.
    pub fn metadata(&self) -> Result<Metadata> {
        self.core
            .getattr(self.at.last())
            .map(|a| Metadata::from(&a))
            .map_err(|e| self.err(e))
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were
    /// read (0 at or past the end). Does not move the position.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = self.core.read(self.fh, offset, buf.len(), &mut scratch);
        let n = scratch.len().min(buf.len());
        buf[..n].copy_from_slice(&scratch[..n]);
        self.scratch = scratch;
        r.map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// Writes all of `data` at `offset`. Does not move the position.
    pub fn write_all_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.core
            .write(self.fh, offset, data, false)
            .map_err(|e| self.err(e))?;
        self.size = self.size.max(offset + data.len() as u64);
        Ok(())
    }

    /// Truncates or extends the file to `size` bytes.
    pub fn set_len(&self, size: u64) -> Result<()> {
        let set = SetAttr {
            size: Some(size),
            fh: Some(self.fh),
            ..SetAttr::default()
        };
        self.core
            .runtime()
            .block_on(self.core.setattr(self.at.last(), set, self.caller))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Makes the file's data and header durable (fsync).
    pub fn sync_all(&self) -> Result<()> {
        self.core.fsync(self.fh, false).map_err(|e| self.err(e))
    }

    /// Closes the file.
    pub fn close(self) -> Result<()> {
        // Writes reach the backing file as they are made: nothing is left
        // to fail here. Dropping releases the handle.
        Ok(())
    }
}

impl Drop for File {
    fn drop(&mut self) {
        self.core.release(self.fh);
    }
}

impl Read for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for File {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(n) => {
                self.pos = n;
                return Ok(n);
            }
            SeekFrom::Current(d) => (self.pos, d),
            SeekFrom::End(d) => (self.len()?, d),
        };
        match base.0.checked_add_signed(base.1) {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}
