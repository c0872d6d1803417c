#!/usr/bin/env python3
"""Python package against the mount: read many small files, cold, with
several processes. See docs/BENCHMARKS.md ("Python package against the mount").

    python_read.py [--files N] [--size BYTES] [--procs P] [--reps R]
                   [--kmsfs BIN] [--workdir DIR]

Writes N files of SIZE bytes (default 20,000 x 100 KiB, 1,000 per
directory) through a kmsfs mount of a fresh volume (local keyring, private
trusted configuration), unmounts, then reads them all in a shuffled order
with P processes (default 4), R times each way (default 1):

  python  each process opens its own kmsfs.Volume and calls read_bytes;
          no mount exists
  mount   a fresh mount; each process reads open(path, "rb").read()

The page cache is dropped before every read. Prints one line per figure and
a JSON summary. Needs root (FUSE, drop_caches) and the kmsfs package
(scripts/test-python.sh installs it into a virtualenv: run this with that
virtualenv's python).
"""

import argparse
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ml_files  # noqa: E402  (the same files as run.sh's ML workload)

import kmsfs  # noqa: E402

VOLUME = None
CHUNK = 100


def run(kmsfs_bin, *args):
    out = subprocess.run([kmsfs_bin, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("python_read: kmsfs %s failed (%d): %s" % (" ".join(args), out.returncode, out.stderr.strip()))


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def unmount(kmsfs_bin, mnt):
    run(kmsfs_bin, "umount", mnt)
    deadline = time.monotonic() + 20
    while mounted(mnt):
        if time.monotonic() > deadline:
            sys.exit("python_read: %s did not unmount" % mnt)
        time.sleep(0.05)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def open_volume(backing):
    global VOLUME
    VOLUME = kmsfs.Volume(backing)


def read_python(paths):
    return sum(len(VOLUME.read_bytes(p)) for p in paths)


def read_mount(paths):
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            total += len(f.read())
    return total


def timed_read(procs, chunks, reader, initializer=None, initargs=()):
    start = time.monotonic()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs, initializer=initializer, initargs=initargs) as pool:
        nbytes = sum(pool.imap_unordered(reader, chunks))
    return nbytes, time.monotonic() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--size", type=int, default=100 * 1024)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--kmsfs", default=os.environ.get("KMSFS"), help="the kmsfs binary (default: $KMSFS)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new one in /var/tmp)")
    a = ap.parse_args()
    if not a.kmsfs or not os.access(a.kmsfs, os.X_OK):
        sys.exit("python_read: give the kmsfs binary with --kmsfs or $KMSFS")
    if os.geteuid() != 0:
        sys.exit("python_read: needs root (FUSE mounts, drop_caches)")

    work = tempfile.mkdtemp(prefix="kmsfs-pyread-", dir=a.workdir or "/var/tmp")
    backing, mnt = os.path.join(work, "backing"), os.path.join(work, "mnt")
    os.mkdir(mnt)
    os.environ["KMSFS_CONFIG"] = os.path.join(work, "kmsfs.toml")
    log = os.path.join(work, "kmsfs.log")
    results = []
    try:
        run(a.kmsfs, "init", backing, "--kms", "local", "--key-file", os.path.join(work, "keys"))
        run(a.kmsfs, "mount", backing, mnt, "--log-file", log)
        try:
            start = time.monotonic()
            ml_files.create(mnt, a.files, a.size)
            print("wrote %d files of %d bytes through the mount in %.1f s" % (a.files, a.size, time.monotonic() - start))
        finally:
            unmount(a.kmsfs, mnt)

        rels = [os.path.relpath(ml_files.path_of(mnt, i), mnt) for i in range(a.files)]
        expected = a.files * a.size
        for rep in range(a.reps):
            random.Random(rep).shuffle(rels)
            for way in ("python", "mount"):
                if way == "python":
                    chunks = [["/" + r for r in rels[i : i + CHUNK]] for i in range(0, len(rels), CHUNK)]
                    drop_caches()
                    nbytes, secs = timed_read(a.procs, chunks, read_python, open_volume, (backing,))
                else:
                    chunks = [[os.path.join(mnt, r) for r in rels[i : i + CHUNK]] for i in range(0, len(rels), CHUNK)]
                    run(a.kmsfs, "mount", backing, mnt, "--log-file", log)
                    try:
                        drop_caches()
                        nbytes, secs = timed_read(a.procs, chunks, read_mount)
                    finally:
                        unmount(a.kmsfs, mnt)
                if nbytes != expected:
                    sys.exit("python_read: %s read %d bytes, expected %d" % (way, nbytes, expected))
                r = {
                    "way": way,
                    "rep": rep + 1,
                    "files": a.files,
                    "procs": a.procs,
                    "seconds": round(secs, 3),
                    "files_s": round(a.files / secs, 1),
                    "mb_s": round(nbytes / secs / 1e6, 1),
                }
                results.append(r)
                print(
                    "%-6s rep %d: %d files x %d bytes, %d processes, cold: %.2f s = %.0f files/s, %.1f MB/s"
                    % (way, rep + 1, a.files, a.size, a.procs, secs, r["files_s"], r["mb_s"]),
                    flush=True,
                )
    finally:
        if mounted(mnt):
            subprocess.run([a.kmsfs, "umount", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
