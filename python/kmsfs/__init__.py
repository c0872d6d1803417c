"""Read a kmsfs volume without mounting it.

For containers, CI runners and ML pipelines without /dev/fuse: the backing
directory is opened with the trusted configuration, as `kmsfs mount` does,
and files are decrypted in this process by the kmsfs library itself (the
same format, policies, DEK cache and KMS providers as a mount).

    import kmsfs, numpy
    vol = kmsfs.Volume("/srv/kmsfs/backing")
    with vol.open("/data/x.npy") as f:
        x = numpy.load(f)

Paths are inside the volume and absolute, like "/d/e/x". Errors are
OSError subclasses with the errno a mount would have given
(FileNotFoundError, PermissionError, ...; EIO for a file that fails its
authentication check). Reads release the GIL, so threads read in parallel.

A Volume belongs to the process that opened it (it runs the KMS client's
threads). After a fork (DataLoader workers, multiprocessing), the child
opens its own on first use; files opened before the fork cannot be read in
the child.
"""

import io
import os
import stat as _stat

from . import _kmsfs

__all__ = ["Volume", "DEFAULT_BUFFER_SIZE"]

# Reads are decrypted a block at a time, and larger reads in parallel: a
# larger buffer than io's 8 KiB default means fewer, cheaper calls.
DEFAULT_BUFFER_SIZE = 128 * 1024

_KIND_BITS = {
    "file": _stat.S_IFREG,
    "dir": _stat.S_IFDIR,
    "symlink": _stat.S_IFLNK,
    "fifo": _stat.S_IFIFO,
    "socket": _stat.S_IFSOCK,
    "chardev": _stat.S_IFCHR,
    "blockdev": _stat.S_IFBLK,
}

def _stat_result(t):
    kind, mode, ino, nlink, uid, gid, size, atime, mtime, ctime, rdev = t
    seconds = (atime // 10**9, mtime // 10**9, ctime // 10**9)
    return os.stat_result(
        (_KIND_BITS[kind] | mode, ino, 0, nlink, uid, gid, size) + seconds,
        {
            "st_atime": atime / 1e9,
            "st_mtime": mtime / 1e9,
            "st_ctime": ctime / 1e9,
            "st_atime_ns": atime,
            "st_mtime_ns": mtime,
            "st_ctime_ns": ctime,
            "st_rdev": rdev,
        },
    )


class RawFile(io.RawIOBase):
    """An open kmsfs file as an unbuffered binary reader (io.RawIOBase).

    Volume.open wraps it in io.BufferedReader; use it directly with
    Volume.open(path, buffering=0).
    """

    def __init__(self, native, name):
        super().__init__()
        self._native = native
        self._pid = os.getpid()
        self.name = name
        self.mode = "rb"

    def _file(self):
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if os.getpid() != self._pid:
            raise OSError(
                "kmsfs: %s was opened before this process was forked; "
                "open it again in this process" % self.name
            )
        return self._native

    def readable(self):
        self._file()
        return True

    def seekable(self):
        self._file()
        return True

    def read(self, size=-1):
        return self._file().read(-1 if size is None else size)

    def readall(self):
        return self._file().read(-1)

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        data = self._file().read(len(view))
        view[: len(data)] = data
        return len(data)

    def seek(self, offset, whence=io.SEEK_SET):
        return self._file().seek(offset, whence)

    def tell(self):
        return self._file().tell()

    def fileno(self):
        raise io.UnsupportedOperation("a kmsfs file has no file descriptor")

    def close(self):
        # In a forked child the native file is left alone (see _volume).
        if not self.closed and os.getpid() == self._pid:
            self._native.close()
        super().close()

    def __repr__(self):
        return "<kmsfs.RawFile name=%r>" % (self.name,)


class Volume:
    """A kmsfs backing directory opened for reading.

    Volume(backing, config=None): `config` is the trusted configuration
    (default: $KMSFS_CONFIG, else /etc/kmsfs/kmsfs.toml), as for `kmsfs
    mount`. Opening connects the volume's keys and checks its configuration.
    """

    def __init__(self, backing, config=None):
        self._backing = os.fspath(backing)
        self._config = None if config is None else os.fspath(config)
        self._native = _kmsfs.Volume(self._backing, self._config)
        self._pid = os.getpid()

    def _volume(self):
        if os.getpid() != self._pid:
            # Forked: this process has none of the parent's KMS threads, so
            # it opens its own volume (the native one inherited is never
            # dropped here: see ForkLocal in src/lib.rs).
            self._native = _kmsfs.Volume(self._backing, self._config)
            self._pid = os.getpid()
        return self._native

    def __reduce__(self):
        # Pickled (spawned DataLoader workers): the child opens its own.
        return (Volume, (self._backing, self._config))

    def __repr__(self):
        return "kmsfs.Volume(%r)" % (self._backing,)

    @property
    def backing(self):
        """The backing directory (absolute)."""
        return os.fspath(self._volume().backing)

    def open(self, path, mode="rb", buffering=-1, encoding=None, errors=None, newline=None):
        """Opens file `path` for reading, like the built-in open: "rb" (the
        default) gives an io.BufferedReader, "r" a text reader, and
        buffering=0 with "rb" the raw RawFile."""
        if mode not in ("r", "rb", "rt"):
            raise ValueError("kmsfs: mode %r: a kmsfs.Volume is read-only; use 'rb' or 'r'" % (mode,))
        path = os.fspath(path)
        raw = RawFile(self._volume().open(path), path)
        if buffering == 0:
            if mode != "rb":
                raise ValueError("can't have unbuffered text I/O")
            return raw
        size = DEFAULT_BUFFER_SIZE if buffering in (-1, 1) else buffering
        buffered = io.BufferedReader(raw, buffer_size=size)
        if mode == "rb":
            return buffered
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, newline=newline)

    def read_bytes(self, path):
        """The whole content of file `path`."""
        f = self._volume().open(os.fspath(path))
        try:
            return f.read(-1)
        finally:
            f.close()

    def read_text(self, path, encoding=None, errors=None):
        """The content of file `path`, decoded."""
        with self.open(path, "r", encoding=encoding, errors=errors) as f:
            return f.read()

    def listdir(self, path="/"):
        """The names in directory `path`, without '.' and '..' (in the
        backing directory's order, like os.listdir)."""
        return [name for name, _ in self._volume().read_dir(os.fspath(path))]

    def stat(self, path):
        """An os.stat_result for `path` (a symlink's own: no link is
        followed); st_size is the plaintext size, st_dev is 0."""
        return _stat_result(self._volume().metadata(os.fspath(path)))

    lstat = stat

    def exists(self, path):
        """Whether `path` names an entry."""
        return self._volume().exists(os.fspath(path))

    def isdir(self, path):
        try:
            return _stat.S_ISDIR(self.stat(path).st_mode)
        except FileNotFoundError:
            return False

    def isfile(self, path):
        try:
            return _stat.S_ISREG(self.stat(path).st_mode)
        except FileNotFoundError:
            return False

    def walk(self, top="/", topdown=True, onerror=None):
        """Like os.walk: yields (dirpath, dirnames, filenames) for `top` and
        every directory below it. Symlinks are never followed and are listed
        in filenames; with topdown, pruning dirnames in place skips them."""
        top = os.fspath(top)
        try:
            entries = self._volume().read_dir(top)
        except OSError as e:
            if onerror is not None:
                onerror(e)
            return
        dirnames = [name for name, kind in entries if kind == "dir"]
        filenames = [name for name, kind in entries if kind != "dir"]
        if topdown:
            yield top, dirnames, filenames
        for name in dirnames:
            yield from self.walk(_join(top, name), topdown, onerror)
        if not topdown:
            yield top, dirnames, filenames


def _join(directory, name):
    return directory + name if directory.endswith("/") else directory + "/" + name
