//! The native half of the `kmsfs` Python package: a thin layer over
//! [`kmsfs::Volume`]. Every call that touches the disk or a KMS runs with
//! the GIL released, so threads (and DataLoader workers' threads) read in
//! parallel. The Python half (`kmsfs/__init__.py`) adds the `io` file
//! object, `walk` and `stat`.

use std::io::{Seek, SeekFrom};
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Mutex;

use kmsfs::volume::{self, FileKind, Metadata, Options, VolumeError};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The OSError a program reading through a mount would have seen: the
/// errno picks the subclass (FileNotFoundError, PermissionError, ...), the
/// library's message says which file and what to do.
fn os_error(e: VolumeError) -> PyErr {
    match e.errno() {
        Some(errno) => PyOSError::new_err((errno, e.to_string())),
        None => PyOSError::new_err(e.to_string()),
    }
}

/// An `io::Error` from the library's `Seek`, with its errno kept.
fn io_os_error(e: std::io::Error) -> PyErr {
    match volume::errno_of(&e) {
        Some(errno) => PyOSError::new_err((errno, e.to_string())),
        None => PyOSError::new_err(e.to_string()),
    }
}

fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
        FileKind::CharDevice => "chardev",
        FileKind::BlockDevice => "blockdev",
    }
}

fn nanos(t: std::time::SystemTime) -> i128 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// (kind, mode, ino, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns,
/// rdev): what `kmsfs.Volume.stat` turns into an `os.stat_result`.
type StatTuple = (
    &'static str,
    u32,
    u64,
    u32,
    u32,
    u32,
    u64,
    i128,
    i128,
    i128,
    u32,
);

fn stat_tuple(m: &Metadata) -> StatTuple {
    (
        kind_name(m.kind),
        m.mode,
        m.ino,
        m.nlink,
        m.uid,
        m.gid,
        m.size,
        nanos(m.atime),
        nanos(m.mtime),
        nanos(m.ctime),
        m.rdev,
    )
}

/// A value that is dropped only in the process that made it. A forked
/// child has none of the parent's threads, and dropping a volume there
/// would wait forever for its KMS runtime's threads to stop: the child
/// leaks it instead.
struct ForkLocal<T> {
    value: ManuallyDrop<T>,
    pid: u32,
}

impl<T> ForkLocal<T> {
    fn new(value: T) -> Self {
        ForkLocal {
            value: ManuallyDrop::new(value),
            pid: std::process::id(),
        }
    }
}

impl<T> Deref for ForkLocal<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Drop for ForkLocal<T> {
    fn drop(&mut self) {
        if std::process::id() == self.pid {
            // SAFETY: dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.value) }
        }
    }
}

/// An opened kmsfs volume, read-only.
#[pyclass(module = "kmsfs._kmsfs", frozen)]
struct Volume {
    volume: ForkLocal<kmsfs::Volume>,
}

#[pymethods]
impl Volume {
    /// Opens backing directory `backing` with trusted configuration
    /// `config` (default: $KMSFS_CONFIG, else /etc/kmsfs/kmsfs.toml).
    #[new]
    #[pyo3(signature = (backing, config=None))]
    fn new(py: Python<'_>, backing: PathBuf, config: Option<PathBuf>) -> PyResult<Self> {
        let options = Options {
            config,
            // This package only reads: a bug or a stray call can change nothing.
            read_only: true,
            ..Options::default()
        };
        let volume = py
            .detach(|| kmsfs::Volume::open_with(&backing, &options))
            .map_err(os_error)?;
        Ok(Volume {
            volume: ForkLocal::new(volume),
        })
    }

    /// The backing directory (absolute).
    #[getter]
    fn backing(&self) -> PathBuf {
        self.volume.backing().to_owned()
    }

    /// Opens file `path` for reading.
    fn open(&self, py: Python<'_>, path: PathBuf) -> PyResult<RawFile> {
        let file = py
            .detach(|| self.volume.open_file(&path))
            .map_err(os_error)?;
        Ok(RawFile {
            file: ForkLocal::new(Mutex::new(Some(file))),
        })
    }

    /// The entries of directory `path` as (name, kind) pairs.
    fn read_dir(
        &self, py: Python<'_>, path: PathBuf,
    ) -> PyResult<Vec<(std::ffi::OsString, &'static str)>> {
        let entries = py
            .detach(|| self.volume.read_dir(&path))
            .map_err(os_error)?;
        Ok(entries
            .into_iter()
            .map(|e| (e.name, kind_name(e.metadata.kind)))
            .collect())
    }

    /// The attributes of `path` (a symlink's own) as a tuple.
    fn metadata(&self, py: Python<'_>, path: PathBuf) -> PyResult<StatTuple> {
        let m = py
            .detach(|| self.volume.metadata(&path))
            .map_err(os_error)?;
        Ok(stat_tuple(&m))
    }

    /// Whether `path` names an entry.
    fn exists(&self, py: Python<'_>, path: PathBuf) -> PyResult<bool> {
        py.detach(|| self.volume.exists(&path)).map_err(os_error)
    }
}

/// An open file: the raw reader under `kmsfs.Volume.open`'s
/// `io.BufferedReader`.
#[pyclass(module = "kmsfs._kmsfs", frozen)]
struct RawFile {
    /// None once closed.
    file: ForkLocal<Mutex<Option<volume::File>>>,
}

impl RawFile {
    /// Runs `f` on the open file, without the GIL.
    fn with_file<T: Send>(
        &self, py: Python<'_>, f: impl FnOnce(&mut volume::File) -> PyResult<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_mut() {
                Some(file) => f(file),
                None => Err(PyValueError::new_err("I/O operation on closed file")),
            }
        })
    }
}

#[pymethods]
impl RawFile {
    /// Reads up to `size` bytes (all that is left if negative) from the
    /// position; b"" at the end.
    #[pyo3(signature = (size=-1))]
    fn read<'py>(&self, py: Python<'py>, size: i64) -> PyResult<Bound<'py, PyBytes>> {
        let (pos, len) = self.with_file(py, |f| {
            let pos = f.stream_position().map_err(io_os_error)?;
            Ok((pos, f.len().map_err(os_error)?))
        })?;
        let left = len.saturating_sub(pos);
        let want = if size < 0 {
            left
        } else {
            left.min(size as u64)
        } as usize;
        let mut got = 0;
        // Decrypted straight into the bytes object; a file that shrank
        // meanwhile gives a shorter copy.
        let bytes = PyBytes::new_with(py, want, |buf| {
            got = self.with_file(py, |f| {
                let mut n = 0;
                while n < buf.len() {
                    match f.read_at(&mut buf[n..], pos + n as u64).map_err(os_error)? {
                        0 => break,
                        k => n += k,
                    }
                }
                f.seek(SeekFrom::Start(pos + n as u64))
                    .map_err(io_os_error)?;
                Ok(n)
            })?;
            Ok(())
        })?;
        if got == want {
            Ok(bytes)
        } else {
            Ok(PyBytes::new(py, &bytes.as_bytes()[..got]))
        }
    }

    /// Moves the position as io's seek (whence 0, 1 or 2); returns it.
    #[pyo3(signature = (offset, whence=0))]
    fn seek(&self, py: Python<'_>, offset: i64, whence: i32) -> PyResult<u64> {
        let to = match whence {
            0 if offset >= 0 => SeekFrom::Start(offset as u64),
            0 => {
                return Err(PyValueError::new_err(format!(
                    "negative seek position {offset}"
                )))
            }
            1 => SeekFrom::Current(offset),
            2 => SeekFrom::End(offset),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "invalid whence ({whence}, should be 0, 1 or 2)"
                )))
            }
        };
        self.with_file(py, |f| f.seek(to).map_err(io_os_error))
    }

    fn tell(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_file(py, |f| f.stream_position().map_err(io_os_error))
    }

    /// The file's plaintext size now.
    fn size(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_file(py, |f| f.len().map_err(os_error))
    }

    /// The attributes of the open file as a tuple (see `Volume.metadata`).
    fn metadata(&self, py: Python<'_>) -> PyResult<StatTuple> {
        self.with_file(py, |f| {
            f.metadata().map(|m| stat_tuple(&m)).map_err(os_error)
        })
    }

    /// Releases the file; later calls raise ValueError.
    fn close(&self, py: Python<'_>) {
        py.detach(|| drop(self.file.lock().unwrap_or_else(|p| p.into_inner()).take()));
    }
}

#[pymodule]
fn _kmsfs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Volume>()?;
    m.add_class::<RawFile>()?;
    Ok(())
}
