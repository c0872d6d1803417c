//! `kmsfs cat`, `kmsfs export` and `kmsfs import`: a volume's files out
//! and in without a mount, through the library (`kmsfs::Volume`), so with
//! the mount's own code for every header, key and block.
//!
//! Export and import keep modes, times, symlinks, hard links, FIFOs,
//! extended attributes and (as root) owners. One entry that cannot be
//! copied is reported and the rest go on; the command then fails.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::Serialize;

use kmsfs::volume::{FileKind, Metadata, Options, Volume};

use super::{absolute, lifecycle::progress, mountinfo, print_json, trust};

/// Plaintext moved per read or write: large enough that a read decrypts
/// its blocks in parallel.
const CHUNK: usize = 4 << 20;

#[derive(Args)]
pub struct CatArgs {
    backing: PathBuf,
    /// Files inside the volume, like /d/e/x.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ExportArgs {
    backing: PathBuf,
    /// [DIR] OUT: the directory inside the volume to export (default /),
    /// and the plaintext directory to create (it must not exist, or be
    /// empty).
    #[arg(num_args = 1..=2, required = true, value_name = "[DIR] OUT")]
    dir_out: Vec<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ImportArgs {
    /// The plaintext directory to import.
    src: PathBuf,
    backing: PathBuf,
    /// Where in the volume (created if needed), like /datasets/a; default /.
    #[arg(default_value = "/")]
    dir: PathBuf,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// What an export or import did.
#[derive(Serialize, Default)]
struct Summary {
    operation: &'static str,
    entries: u64,
    files: u64,
    dirs: u64,
    symlinks: u64,
    hard_links: u64,
    others: u64,
    bytes: u64,
    failed: u64,
    seconds: f64,
}

impl Summary {
    fn count(&mut self, kind: FileKind, linked: bool, bytes: u64) {
        self.entries += 1;
        self.bytes += bytes;
        match kind {
            _ if linked => self.hard_links += 1,
            FileKind::File => self.files += 1,
            FileKind::Dir => self.dirs += 1,
            FileKind::Symlink => self.symlinks += 1,
            _ => self.others += 1,
        }
    }

    fn report(&self, json: bool, from: &str, to: &str) -> Result<()> {
        if json {
            print_json(self)?;
        } else {
            eprintln!(
                "kmsfs {}: {} entries from {from} to {to}: {} files ({} bytes), {} directories, \
                 {} symlinks, {} hard links, {} other, {} failed; {:.1} s",
                self.operation,
                self.entries,
                self.files,
                self.bytes,
                self.dirs,
                self.symlinks,
                self.hard_links,
                self.others,
                self.failed,
                self.seconds
            );
        }
        if self.failed > 0 {
            bail!(
                "{} entries could not be {}ed (listed above); fix what each says and run it again",
                self.failed,
                self.operation
            );
        }
        Ok(())
    }
}

fn open_volume(backing: &Path, read_only: bool) -> Result<Volume> {
    let options = Options {
        config: Some(trust::path()),
        read_only,
        ..Options::default()
    };
    Volume::open_with(absolute(backing)?, &options).map_err(Into::into)
}

/// `kmsfs cat`: each file's plaintext to stdout, in order.
pub fn cat(a: CatArgs) -> Result<()> {
    let volume = open_volume(&a.backing, true)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut buf = vec![0; CHUNK];
    let mut failed = 0;
    for path in &a.paths {
        let copied = volume
            .open_file(path)
            .map_err(anyhow::Error::from)
            .and_then(|mut file| loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break Ok(());
                }
                out.write_all(&buf[..n])?;
            });
        if let Err(e) = copied {
            if is_broken_pipe(&e) {
                return Ok(());
            }
            eprintln!("kmsfs cat: {e:#}");
            failed += 1;
        }
    }
    out.flush()?;
    if failed > 0 {
        bail!("{failed} of {} files could not be read", a.paths.len());
    }
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// `kmsfs export`: a volume's subtree to a new plaintext directory.
pub fn export(a: ExportArgs) -> Result<()> {
    let (dir, out) = match &a.dir_out[..] {
        [out] => (PathBuf::from("/"), out.clone()),
        [dir, out] => (dir.clone(), out.clone()),
        _ => unreachable!("clap takes one or two"),
    };
    let out = absolute(&out)?;
    let volume = open_volume(&a.backing, true)?;
    let top = volume.metadata(&dir)?;
    if !top.is_dir() {
        bail!("{} is not a directory of the volume", dir.display());
    }
    prepare_out(&out)?;
    let started = Instant::now();
    let progress = progress("export");
    let entries: Vec<_> = volume.walk(&dir).collect::<Result<_, _>>()?;
    progress.start(entries.len() as u64);
    let mut summary = Summary {
        operation: "export",
        ..Summary::default()
    };
    // Inode (as the volume shows it) -> the first exported name.
    let mut linked: HashMap<u64, PathBuf> = HashMap::new();
    let mut dirs = vec![(out.clone(), top)];
    for entry in &entries {
        let rel = entry
            .path
            .strip_prefix(&dir)
            .expect("walk stays below its top");
        let target = out.join(rel);
        let meta = &entry.metadata;
        let first = (meta.kind == FileKind::File && meta.nlink > 1)
            .then(|| linked.get(&meta.ino).cloned())
            .flatten();
        let done = match &first {
            Some(first) => fs::hard_link(first, &target).map_err(anyhow::Error::from),
            None => export_entry(&volume, &entry.path, meta, &target),
        };
        match done {
            Ok(()) => {
                if meta.is_dir() {
                    dirs.push((target, meta.clone()));
                } else if meta.kind == FileKind::File && meta.nlink > 1 && first.is_none() {
                    linked.insert(meta.ino, target);
                }
                let bytes = if meta.is_file() && first.is_none() {
                    meta.size
                } else {
                    0
                };
                summary.count(meta.kind, first.is_some(), bytes);
            }
            Err(e) => {
                summary.failed += 1;
                progress.note(&format!("kmsfs export: {}: {e:#}", entry.path.display()));
            }
        }
        progress.advance(1);
    }
    // Directories last, deepest first: filling one changed its times, and
    // a read-only mode would have kept it from being filled.
    for (path, meta) in dirs.iter().rev() {
        if let Err(e) = set_local_attrs(path, meta) {
            summary.failed += 1;
            progress.note(&format!("kmsfs export: {}: {e:#}", path.display()));
        }
    }
    progress.finish();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.report(
        a.json,
        &format!("{}:{}", a.backing.display(), dir.display()),
        &out.display().to_string(),
    )
}

/// OUT must be new or an empty directory: an export never mixes its
/// plaintext into other files or follows what is there.
fn prepare_out(out: &Path) -> Result<()> {
    match fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(out).with_context(|| format!("cannot create {}", out.display()))
        }
        Err(e) => Err(anyhow!("{}: {e}", out.display())),
        Ok(m) if m.is_dir() => {
            if fs::read_dir(out)?.next().is_some() {
                bail!(
                    "{} is not empty; export into a new or empty directory",
                    out.display()
                );
            }
            Ok(())
        }
        Ok(_) => bail!("{} exists and is not a directory", out.display()),
    }
}

/// Copies one entry of the volume to `target` (a new name), with its
/// attributes; a directory's attributes are set later.
fn export_entry(volume: &Volume, path: &Path, meta: &Metadata, target: &Path) -> Result<()> {
    match meta.kind {
        FileKind::Dir => {
            // Owner-only while it is filled; its mode comes at the end.
            fs::DirBuilder::new().mode(0o700).create(target)?;
            copy_xattrs_out(volume, path, target)?;
            return Ok(());
        }
        FileKind::File => {
            let mut src = volume.open_file(path)?;
            let mut dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(target)?;
            copy_stream(&mut src, &mut dst)?;
        }
        FileKind::Symlink => {
            std::os::unix::fs::symlink(volume.read_link(path)?, target)?;
        }
        FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice => {
            let type_bits = match meta.kind {
                FileKind::Fifo => libc::S_IFIFO,
                FileKind::CharDevice => libc::S_IFCHR,
                _ => libc::S_IFBLK,
            };
            let c = cstring(target)?;
            // SAFETY: a valid C string; mknod has no other preconditions.
            if unsafe { libc::mknod(c.as_ptr(), type_bits | 0o600, meta.rdev as libc::dev_t) } != 0
            {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        FileKind::Socket => bail!("a socket cannot be copied (skipped)"),
    }
    copy_xattrs_out(volume, path, target)?;
    set_local_attrs(target, meta)
}

fn copy_stream(src: &mut impl Read, dst: &mut impl Write) -> Result<u64> {
    let mut buf = vec![0; CHUNK];
    let mut total = 0;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        dst.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn copy_xattrs_out(volume: &Volume, path: &Path, target: &Path) -> Result<()> {
    for name in volume.list_xattr(path)? {
        let value = volume.get_xattr(path, &name)?;
        let (c, n) = (cstring(target)?, cstring(Path::new(&name))?);
        // SAFETY: valid C strings and a buffer of the given length.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            bail!("extended attribute {}: {e}", name.to_string_lossy());
        }
    }
    Ok(())
}

/// Owner (as root), mode (not of a symlink) and times of exported `path`.
fn set_local_attrs(path: &Path, meta: &Metadata) -> Result<()> {
    let c = cstring(path)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // SAFETY: a valid C string.
        if unsafe { libc::lchown(c.as_ptr(), meta.uid, meta.gid) } != 0 {
            return Err(std::io::Error::last_os_error()).context("chown");
        }
    }
    if meta.kind != FileKind::Symlink {
        // SAFETY: a valid C string.
        if unsafe { libc::chmod(c.as_ptr(), meta.mode & 0o7777) } != 0 {
            return Err(std::io::Error::last_os_error()).context("chmod");
        }
    }
    let times = [timespec(meta.atime), timespec(meta.mtime)];
    // SAFETY: a valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("setting times");
    }
    Ok(())
}

fn timespec(t: SystemTime) -> libc::timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => libc::timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as i64,
        },
        // Before 1970: rare enough to round to whole seconds.
        Err(e) => libc::timespec {
            tv_sec: -(e.duration().as_secs() as i64),
            tv_nsec: 0,
        },
    }
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| anyhow!("{}: a name with a NUL byte", p.display()))
}

/// `kmsfs import`: a plaintext tree into a volume, without a mount.
pub fn import(a: ImportArgs) -> Result<()> {
    let src = absolute(&a.src)?;
    if !fs::symlink_metadata(&src)
        .with_context(|| format!("cannot read {}", src.display()))?
        .is_dir()
    {
        bail!("{} is not a directory", src.display());
    }
    let backing = absolute(&a.backing)?;
    if let Some(mnt) = mountinfo::mountpoint_of(&backing) {
        // Two filesystems over one backing directory do not see each
        // other's changes: the mount would serve what it cached before.
        bail!(
            "{} is mounted at {}; copy into the mount instead (cp -a {}/. {}/), or unmount it first",
            backing.display(),
            mnt.display(),
            src.display(),
            mnt.join(a.dir.strip_prefix("/").unwrap_or(&a.dir)).display()
        );
    }
    let volume = open_volume(&backing, false)?;
    volume.create_dir_all(&a.dir)?;
    let started = Instant::now();
    let progress = progress("import");
    let entries = local_tree(&src)?;
    progress.start(entries.len() as u64);
    let mut summary = Summary {
        operation: "import",
        ..Summary::default()
    };
    let mut linked: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs = Vec::new();
    for (local, meta) in &entries {
        let rel = local.strip_prefix(&src).expect("below the source");
        let target = a.dir.join(rel);
        let key = (meta.dev(), meta.ino());
        let first = (meta.is_file() && meta.nlink() > 1)
            .then(|| linked.get(&key).cloned())
            .flatten();
        let done = match &first {
            Some(first) => replace_with_link(&volume, first, &target),
            None => import_entry(&volume, local, meta, &target),
        };
        let kind = kind_of(meta);
        match done {
            Ok(()) => {
                if meta.is_dir() {
                    dirs.push((target, meta.clone()));
                } else if meta.is_file() && meta.nlink() > 1 && first.is_none() {
                    linked.insert(key, target);
                }
                let bytes = if meta.is_file() && first.is_none() {
                    meta.len()
                } else {
                    0
                };
                summary.count(kind, first.is_some(), bytes);
            }
            Err(e) => {
                summary.failed += 1;
                progress.note(&format!("kmsfs import: {}: {e:#}", local.display()));
            }
        }
        progress.advance(1);
    }
    for (path, meta) in dirs.iter().rev() {
        if let Err(e) = set_volume_attrs(&volume, path, meta) {
            summary.failed += 1;
            progress.note(&format!("kmsfs import: {}: {e:#}", path.display()));
        }
    }
    progress.finish();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.report(
        a.json,
        &src.display().to_string(),
        &format!("{}:{}", backing.display(), a.dir.display()),
    )
}

/// Every entry below `top`, each directory before its contents (paths
/// sort component by component, so a directory sorts before what is in
/// it), never following a symlink.
fn local_tree(top: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut out = Vec::new();
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)
                .with_context(|| format!("cannot stat {}", path.display()))?;
            if meta.is_dir() {
                pending.push(path.clone());
            }
            out.push((path, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn kind_of(meta: &fs::Metadata) -> FileKind {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        FileKind::Dir
    } else if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_fifo() {
        FileKind::Fifo
    } else if t.is_socket() {
        FileKind::Socket
    } else if t.is_char_device() {
        FileKind::CharDevice
    } else if t.is_block_device() {
        FileKind::BlockDevice
    } else {
        FileKind::File
    }
}

/// Makes `target` another name of `first`, replacing a file there.
fn replace_with_link(volume: &Volume, first: &Path, target: &Path) -> Result<()> {
    match volume.hard_link(first, target) {
        Err(e) if e.errno() == Some(libc::EEXIST) => {
            volume.remove_file(target)?;
            volume.hard_link(first, target)?;
        }
        other => other?,
    }
    Ok(())
}

/// Copies local entry `local` into the volume at `target`, with its
/// attributes (a directory's are set later). A file already there is
/// overwritten, as cp does; a directory already there is merged into.
fn import_entry(volume: &Volume, local: &Path, meta: &fs::Metadata, target: &Path) -> Result<()> {
    match kind_of(meta) {
        FileKind::Dir => {
            match volume.create_dir(target, 0o700) {
                Err(e) if e.errno() == Some(libc::EEXIST) && volume.metadata(target)?.is_dir() => {}
                other => other?,
            }
            copy_xattrs_in(volume, local, target)?;
            return Ok(());
        }
        FileKind::File => {
            let mut src = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(local)?;
            let mut dst = volume.create_with_mode(target, 0o600)?;
            copy_stream(&mut src, &mut dst)?;
            dst.sync_all()?;
        }
        FileKind::Symlink => {
            volume.symlink(fs::read_link(local)?, target)?;
        }
        FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice => {
            volume.make_node(target, meta.mode(), meta.rdev() as u32)?;
        }
        FileKind::Socket => bail!("a socket cannot be copied (skipped)"),
    }
    copy_xattrs_in(volume, local, target)?;
    set_volume_attrs(volume, target, meta)
}

fn copy_xattrs_in(volume: &Volume, local: &Path, target: &Path) -> Result<()> {
    let c = cstring(local)?;
    let names = xattr_list(&c)?;
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let value = xattr_get(&c, &cstring(Path::new(name))?)?;
        volume
            .set_xattr(target, name, &value)
            .with_context(|| format!("extended attribute {}", name.to_string_lossy()))?;
    }
    Ok(())
}

/// llistxattr's name list of `path`.
fn xattr_list(path: &CString) -> Result<Vec<u8>> {
    sized(|buf, len| unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) })
}

/// lgetxattr's value of `name` of `path`.
fn xattr_get(path: &CString, name: &CString) -> Result<Vec<u8>> {
    sized(|buf, len| unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.cast(), len) })
}

/// Calls a size-then-fill syscall (`call(buf, len)` returns the length or
/// -1), growing the buffer while it races a change (ERANGE).
fn sized(call: impl Fn(*mut u8, usize) -> isize) -> Result<Vec<u8>> {
    loop {
        let n = call(std::ptr::null_mut(), 0);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(Vec::new());
            }
            return Err(e.into());
        }
        let mut buf = vec![0u8; n as usize];
        let m = call(buf.as_mut_ptr(), buf.len());
        if m >= 0 {
            buf.truncate(m as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e.into());
        }
    }
}

/// Owner (as root), mode and times of imported `path` in the volume.
fn set_volume_attrs(volume: &Volume, path: &Path, meta: &fs::Metadata) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        volume.set_owner(path, Some(meta.uid()), Some(meta.gid()))?;
    }
    if !meta.is_symlink() {
        volume.set_permissions(path, meta.mode() & 0o7777)?;
    }
    volume.set_times(path, meta.accessed()?, meta.modified()?)?;
    Ok(())
}
