//! Walking a backing directory tree offline (inspection, upgrade, repair).
//! The tree is untrusted: directories are reached through their parent's
//! handle without following symlinks (a symlinked directory is not
//! entered), each directory is opened once, and only regular files are
//! reported, so that sidecars can be read beside them with
//! `sidecar::read_at`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;
use std::rc::Rc;

use crate::format::names::{is_reserved, LIFECYCLE_TEMP_PREFIX};

/// A directory of the tree that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct WalkError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

type Result<T> = std::result::Result<T, WalkError>;

/// Calls `visit(dir, rel, files)` for every directory under (and including)
/// `root`: `dir` is a handle on it, `rel` its path below `root` ("/" for the
/// root, "/a/b" below it) and `files` the names of its regular files.
/// kmsfs's reserved names are left out.
pub fn walk(root: &Path, mut visit: impl FnMut(BorrowedFd<'_>, &str, &[OsString])) -> Result<()> {
    walk_scoped(
        root,
        |_| true,
        |dir, rel, listing| visit(dir, rel, &listing.files),
    )
}

/// What one directory holds, as `walk_scoped` reports it.
#[derive(Clone, Default)]
pub struct Listing {
    /// Regular files, reserved names left out.
    pub files: Vec<OsString>,
    /// Leftover temporary files of a killed `rewrap` or `rekey` (regular
    /// files named with `LIFECYCLE_TEMP_PREFIX`).
    pub temps: Vec<OsString>,
    /// Every reserved name (temporaries included), with its kind: what
    /// `kmsfs fsck` checks.
    pub reserved: Vec<(OsString, Kind)>,
}

/// [`walk`], entering only the directories whose `rel` satisfies `enter`
/// (the root is always visited), and reporting leftover temporary files.
pub fn walk_scoped(
    root: &Path, enter: impl Fn(&str) -> bool,
    mut visit: impl FnMut(BorrowedFd<'_>, &str, &Listing),
) -> Result<()> {
    let cannot_read = |rel: &str, source| WalkError {
        // Escaped: names in the backing directory are untrusted text.
        path: format!("{}{}", root.display(), rel.escape_debug()),
        source,
    };
    // Directories still to visit: (parent, name, rel). A parent stays open
    // while any of its subdirectories waits, so about one handle per level
    // of the tree is open at a time.
    let mut pending: Vec<(Rc<DirHandle>, OsString, String)> = Vec::new();
    let mut list_and_visit = |dir: DirHandle, rel: String, pending: &mut Vec<_>| -> Result<()> {
        let dir = Rc::new(dir);
        let mut listing = Listing::default();
        for (name, kind) in dir.entries().map_err(|e| cannot_read(&rel, e))? {
            if is_reserved(name.as_bytes()) {
                if kind == Kind::RegularFile && name.as_bytes().starts_with(LIFECYCLE_TEMP_PREFIX) {
                    listing.temps.push(name.clone());
                }
                listing.reserved.push((name, kind));
                continue;
            }
            match kind {
                Kind::Directory => {
                    let sub = format!("{rel}/{}", name.to_string_lossy());
                    if enter(&sub) {
                        pending.push((dir.clone(), name, sub));
                    }
                }
                Kind::RegularFile => listing.files.push(name),
                Kind::Other => {}
            }
        }
        visit(
            dir.as_fd(),
            if rel.is_empty() { "/" } else { &rel },
            &listing,
        );
        Ok(())
    };
    // The root is the user's own path: symlinks in it are theirs to follow.
    let root_dir = path_cstr(root.as_os_str())
        .and_then(|c| DirHandle::open(libc::AT_FDCWD, &c, 0))
        .map_err(|e| cannot_read("", e))?;
    list_and_visit(root_dir, String::new(), &mut pending)?;
    while let Some((parent, name, rel)) = pending.pop() {
        let opened = path_cstr(&name)
            .and_then(|c| DirHandle::open(parent.as_raw_fd(), &c, libc::O_NOFOLLOW));
        let dir = match opened {
            Ok(dir) => dir,
            // No longer a directory since it was listed (a symlink now,
            // perhaps): not entered.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => continue,
            Err(e) => return Err(cannot_read(&rel, e)),
        };
        list_and_visit(dir, rel, &mut pending)?;
    }
    Ok(())
}

fn path_cstr(p: &OsStr) -> std::io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// What a directory entry is (from the listing, never following a symlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Directory,
    RegularFile,
    /// Symlinks, FIFOs, sockets, devices: never opened.
    Other,
}

/// An open directory stream; its descriptor also serves `*at` calls.
struct DirHandle(NonNull<libc::DIR>);

impl DirHandle {
    /// Opens directory `name` in `parent` (or the cwd) for listing, with
    /// `extra_flags` (O_NOFOLLOW below the root).
    fn open(parent: RawFd, name: &CStr, extra_flags: i32) -> std::io::Result<Self> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | extra_flags;
        // SAFETY: `name` is a valid C string; the result is checked.
        let fd = unsafe { libc::openat(parent, name.as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: on success the stream owns `fd`; on failure it is closed here.
        match NonNull::new(unsafe { libc::fdopendir(fd) }) {
            Some(stream) => Ok(DirHandle(stream)),
            None => {
                let e = std::io::Error::last_os_error();
                unsafe { libc::close(fd) };
                Err(e)
            }
        }
    }

    /// Every entry but `.` and `..`, with its kind (from the listing, or
    /// from an lstat where the filesystem does not say).
    fn entries(&self) -> std::io::Result<Vec<(OsString, Kind)>> {
        let mut out = Vec::new();
        loop {
            // readdir reports errors only through errno.
            // SAFETY: errno is this thread's; the stream is open.
            let entry = unsafe {
                *libc::__errno_location() = 0;
                libc::readdir(self.0.as_ptr())
            };
            if entry.is_null() {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(0) => Ok(out),
                    _ => Err(e),
                };
            }
            // SAFETY: a non-null entry is valid until the next readdir.
            let (name, d_type) = unsafe {
                let entry = &*entry;
                (CStr::from_ptr(entry.d_name.as_ptr()), entry.d_type)
            };
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            let kind = match d_type {
                libc::DT_DIR => Kind::Directory,
                libc::DT_REG => Kind::RegularFile,
                libc::DT_UNKNOWN => self.kind_by_lstat(name)?,
                _ => Kind::Other,
            };
            out.push((OsStr::from_bytes(name.to_bytes()).to_owned(), kind));
        }
    }

    fn kind_by_lstat(&self, name: &CStr) -> std::io::Result<Kind> {
        // SAFETY: `st` is written by fstatat before it is read.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::fstatat(
                self.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // Removed since it was listed: nothing to report.
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(Kind::Other),
                _ => Err(e),
            };
        }
        Ok(match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Directory,
            libc::S_IFREG => Kind::RegularFile,
            _ => Kind::Other,
        })
    }
}

impl AsRawFd for DirHandle {
    fn as_raw_fd(&self) -> RawFd {
        // SAFETY: the stream is open until drop.
        unsafe { libc::dirfd(self.0.as_ptr()) }
    }
}

impl AsFd for DirHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor stays open as long as the stream, which
        // outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

impl Drop for DirHandle {
    fn drop(&mut self) {
        // SAFETY: the stream is open and closed only here.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}
