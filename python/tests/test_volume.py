"""The kmsfs Python package against a volume written through a real mount.

Run by scripts/test-python.sh, which builds the package and sets KMSFS to
the kmsfs binary. Needs root and /dev/fuse (to write the volume through a
mount) and numpy; fails, never skips, without them. Uses a private trusted
configuration (KMSFS_CONFIG in a temp dir), never /etc/kmsfs.
"""

import errno
import io
import multiprocessing
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import unittest

import numpy

import kmsfs

PLACES = {}
ARRAY = numpy.arange(12 * 1000, dtype=numpy.float32).reshape(12, 1000) / 7
TEXT = "plaintext through the mount, read back without it: \u00e9\n"


def pattern(size, seed):
    # Deterministic bytes of every value, different per seed.
    return bytes((i * 131 + seed * 17 + (i >> 8)) & 0xFF for i in range(size))


# Path inside the volume -> content written through the mount.
FILES = {
    "/hello.txt": TEXT.encode(),
    "/empty": b"",
    "/d/small.bin": pattern(5000, 1),
    "/d/e/large.bin": pattern(3 * 1024 * 1024 + 123, 2),
    "/d/e/deep/x": b"x" * 4096,
    "/tamper.bin": pattern(20000, 3),
}


def kmsfs_cmd(*args):
    binary = os.environ.get("KMSFS")
    if not binary or not os.access(binary, os.X_OK):
        raise RuntimeError("set KMSFS to the kmsfs binary (scripts/test-python.sh does)")
    out = subprocess.run([binary, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError("kmsfs %s failed (%d): %s" % (" ".join(args), out.returncode, out.stderr))
    return out.stdout


def is_mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def setUpModule():
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise RuntimeError("these tests write a volume through a FUSE mount: run as root with /dev/fuse")
    top = tempfile.mkdtemp(prefix="kmsfs-python-")
    os.chmod(top, 0o700)
    PLACES["top"] = top
    backing, mnt = os.path.join(top, "backing"), os.path.join(top, "mnt")
    os.mkdir(mnt)
    # The private trusted configuration: every kmsfs command and every
    # Volume of this test (and of its child processes) uses it.
    os.environ["KMSFS_CONFIG"] = os.path.join(top, "kmsfs.toml")
    kmsfs_cmd("init", backing, "--kms", "local", "--key-file", os.path.join(top, "keys"))
    kmsfs_cmd("mount", backing, mnt, "--log-file", os.path.join(top, "kmsfs.log"))
    try:
        for path, data in FILES.items():
            os.makedirs(os.path.dirname(mnt + path), exist_ok=True)
            with open(mnt + path, "wb") as f:
                f.write(data)
        numpy.save(mnt + "/d/array.npy", ARRAY)
        os.symlink("hello.txt", mnt + "/link")
    finally:
        kmsfs_cmd("umount", mnt)
    deadline = time.monotonic() + 10
    while is_mounted(mnt):
        if time.monotonic() > deadline:
            raise RuntimeError("%s is still mounted" % mnt)
        time.sleep(0.05)
    PLACES["backing"] = backing
    # A ciphertext byte of the second block changed on disk, as an attacker
    # with the backing directory could.
    with open(os.path.join(backing, "tamper.bin"), "r+b") as f:
        f.seek(6000)
        byte = f.read(1)
        f.seek(6000)
        f.write(bytes([byte[0] ^ 0x40]))


def tearDownModule():
    if "top" in PLACES:
        shutil.rmtree(PLACES["top"], ignore_errors=True)


def volume():
    return kmsfs.Volume(PLACES["backing"])


# Run in child processes (module level, so that spawn can find it).
def read_in_child(args):
    vol, path = args
    return vol.read_bytes(path)


CHILD_VOLUME = None


def read_with_inherited(path):
    return CHILD_VOLUME.read_bytes(path)


class ReadTest(unittest.TestCase):
    def test_read_bytes_matches_what_the_mount_wrote(self):
        vol = volume()
        for path, data in FILES.items():
            if path != "/tamper.bin":
                self.assertEqual(vol.read_bytes(path), data, path)

    def test_file_object_read_seek_tell_readinto(self):
        vol = volume()
        data = FILES["/d/e/large.bin"]
        with vol.open("/d/e/large.bin") as f:
            self.assertIsInstance(f, io.BufferedReader)
            self.assertTrue(f.readable() and f.seekable())
            self.assertFalse(f.writable())
            self.assertEqual(f.read(10), data[:10])
            self.assertEqual(f.tell(), 10)
            self.assertEqual(f.seek(0, io.SEEK_END), len(data))
            self.assertEqual(f.read(), b"")
            self.assertEqual(f.seek(-5000, io.SEEK_CUR), len(data) - 5000)
            buf = bytearray(3000)
            self.assertEqual(f.readinto(buf), 3000)
            self.assertEqual(bytes(buf), data[-5000:-2000])
            self.assertEqual(f.seek(4090), 4090)
            # Across a block boundary, and larger than the buffer.
            self.assertEqual(f.read(1 << 20), data[4090 : 4090 + (1 << 20)])
            f.seek(0)
            self.assertEqual(f.read(), data)
            with self.assertRaises(OSError):
                f.fileno()
        self.assertTrue(f.closed)
        with self.assertRaises(ValueError):
            f.read(1)

    def test_raw_file_without_buffer(self):
        vol = volume()
        data = FILES["/d/small.bin"]
        with vol.open("/d/small.bin", buffering=0) as raw:
            self.assertIsInstance(raw, io.RawIOBase)
            buf = memoryview(bytearray(6000))
            self.assertEqual(raw.readinto(buf), len(data))
            self.assertEqual(bytes(buf[: len(data)]), data)
            self.assertEqual(raw.readinto(buf), 0)
            raw.seek(100)
            self.assertEqual(raw.readall(), data[100:])

    def test_text_mode(self):
        with volume().open("/hello.txt", "r", encoding="utf-8") as f:
            self.assertEqual(f.read(), TEXT)
        self.assertEqual(volume().read_text("/hello.txt", encoding="utf-8"), TEXT)
        with self.assertRaises(ValueError):
            volume().open("/hello.txt", "wb")

    def test_numpy_load_on_the_file_object(self):
        with volume().open("/d/array.npy") as f:
            loaded = numpy.load(f)
        numpy.testing.assert_array_equal(loaded, ARRAY)

    def test_listdir_walk_stat(self):
        vol = volume()
        self.assertEqual(sorted(vol.listdir("/")), ["d", "empty", "hello.txt", "link", "tamper.bin"])
        self.assertEqual(sorted(vol.listdir("/d")), ["array.npy", "e", "small.bin"])
        walked = {top: (sorted(dirs), sorted(files)) for top, dirs, files in vol.walk()}
        self.assertEqual(
            walked,
            {
                "/": (["d"], ["empty", "hello.txt", "link", "tamper.bin"]),
                "/d": (["e"], ["array.npy", "small.bin"]),
                "/d/e": (["deep"], ["large.bin"]),
                "/d/e/deep": ([], ["x"]),
            },
        )
        # Pruning dirnames skips them, as with os.walk.
        pruned = []
        for top, dirs, _ in vol.walk("/d"):
            pruned.append(top)
            dirs[:] = [d for d in dirs if d != "deep"]
        self.assertEqual(pruned, ["/d", "/d/e"])
        self.assertEqual([top for top, _, _ in vol.walk(topdown=False)][-1], "/")

        st = vol.stat("/d/e/large.bin")
        self.assertTrue(stat.S_ISREG(st.st_mode))
        self.assertEqual(st.st_size, len(FILES["/d/e/large.bin"]))
        self.assertEqual(st.st_mode & 0o777, 0o644 & ~current_umask())
        self.assertGreater(st.st_mtime, time.time() - 3600)
        self.assertEqual(st.st_mtime_ns // 10**9, int(st.st_mtime))
        self.assertTrue(stat.S_ISDIR(vol.stat("/d").st_mode))
        self.assertTrue(stat.S_ISLNK(vol.stat("/link").st_mode))
        self.assertTrue(vol.exists("/d/e/deep/x"))
        self.assertFalse(vol.exists("/d/nothing"))
        self.assertTrue(vol.isdir("/d") and vol.isfile("/empty"))

    def test_errors_are_oserrors_with_errno(self):
        vol = volume()
        with self.assertRaises(FileNotFoundError) as caught:
            vol.open("/d/nothing.bin")
        self.assertEqual(caught.exception.errno, errno.ENOENT)
        self.assertIn("/d/nothing.bin", str(caught.exception))
        with self.assertRaises(FileNotFoundError):
            vol.listdir("/nothing")
        with self.assertRaises(NotADirectoryError):
            vol.read_bytes("/hello.txt/x")
        with self.assertRaises(NotADirectoryError):
            vol.listdir("/hello.txt")
        with self.assertRaises(IsADirectoryError):
            vol.read_bytes("/d")
        with self.assertRaises(OSError) as caught:
            vol.read_bytes("relative/path")
        self.assertEqual(caught.exception.errno, errno.EINVAL)

    def test_tampered_ciphertext_is_eio_not_wrong_bytes(self):
        vol = volume()
        with self.assertRaises(OSError) as caught:
            vol.read_bytes("/tamper.bin")
        self.assertEqual(caught.exception.errno, errno.EIO)
        self.assertIn("tamper.bin", str(caught.exception))
        with self.assertRaises(OSError) as caught:
            with vol.open("/tamper.bin") as f:
                f.read()
        self.assertEqual(caught.exception.errno, errno.EIO)
        # Unbuffered: the first block is intact, the second is not.
        with vol.open("/tamper.bin", buffering=0) as f:
            self.assertEqual(f.read(4096), FILES["/tamper.bin"][:4096])
            with self.assertRaises(OSError) as caught:
                f.read(4096)
            self.assertEqual(caught.exception.errno, errno.EIO)

    def test_opening_refuses_a_wrong_backing_or_config(self):
        with self.assertRaises(OSError):
            kmsfs.Volume(PLACES["top"])
        with self.assertRaises(OSError) as caught:
            kmsfs.Volume(PLACES["backing"], config=os.path.join(PLACES["top"], "missing.toml"))
        self.assertIn("missing.toml", str(caught.exception))

    def test_threads_read_in_parallel(self):
        vol = volume()
        results, errors = {}, []

        def reader(i):
            try:
                with vol.open("/d/e/large.bin") as f:
                    f.seek(i * 4096)
                    results[i] = f.read()
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        for i in range(4):
            self.assertEqual(results[i], FILES["/d/e/large.bin"][i * 4096 :])

    def test_volume_in_forked_and_spawned_processes(self):
        global CHILD_VOLUME
        CHILD_VOLUME = volume()
        paths = ["/d/small.bin", "/d/e/deep/x", "/hello.txt"]
        # Forked: the Volume used before the fork reopens itself in each child.
        CHILD_VOLUME.read_bytes("/empty")
        with multiprocessing.get_context("fork").Pool(2) as pool:
            self.assertEqual(pool.map(read_with_inherited, paths), [FILES[p] for p in paths])
        # Spawned: the Volume is pickled and reopened in the child.
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            got = pool.map(read_in_child, [(CHILD_VOLUME, p) for p in paths])
        self.assertEqual(got, [FILES[p] for p in paths])
        # The parent's Volume still works.
        self.assertEqual(CHILD_VOLUME.read_bytes("/d/small.bin"), FILES["/d/small.bin"])


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


if __name__ == "__main__":
    unittest.main()
