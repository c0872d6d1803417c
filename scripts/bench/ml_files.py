#!/usr/bin/env python3
"""ML-style small-file helpers for scripts/bench/run.sh.

  ml_files.py create DIR COUNT SIZE        write COUNT files of SIZE bytes
                                           (1,000 per subdirectory)
  ml_files.py list DIR COUNT SEED OUT      write a shuffled list of the paths
  ml_files.py read LIST PROCS              read every listed file whole with
                                           PROCS parallel reader processes;
                                           prints JSON {files, bytes, seconds}
"""
import json
import os
import random
import sys
import time

PER_DIR = 1000


def path_of(root, i):
    return os.path.join(root, "d%03d" % (i // PER_DIR), "f%06d.bin" % i)


def create(root, count, size):
    pool = os.urandom(4 << 20)
    rng = random.Random(1234)
    for i in range(count):
        p = path_of(root, i)
        if i % PER_DIR == 0:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        off = rng.randrange(0, len(pool) - size)
        with open(p, "wb") as f:
            # a per-file prefix makes every file distinct even if slices repeat
            f.write(i.to_bytes(8, "little") + pool[off + 8:off + size])


def make_list(root, count, seed, out):
    paths = [path_of(root, i) for i in range(count)]
    random.Random(seed).shuffle(paths)
    with open(out, "w") as f:
        f.write("\n".join(paths) + "\n")


def reader(paths, wfd):
    n = 0
    total = 0
    bad = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                while True:
                    b = os.read(fd, 1 << 20)
                    if not b:
                        break
                    total += len(b)
            finally:
                os.close(fd)
            n += 1
        except OSError as e:
            bad += 1
            if bad <= 3:
                sys.stderr.write("ml read error: %s: %s\n" % (p, e))
    os.write(wfd, json.dumps([n, total, bad]).encode())
    os.close(wfd)


def read(listfile, procs):
    with open(listfile) as f:
        paths = [line.rstrip("\n") for line in f if line.strip()]
    slices = [paths[k::procs] for k in range(procs)]
    children = []
    t0 = time.monotonic()
    for s in slices:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                reader(s, w)
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r))
    files = total = bad = 0
    for pid, r in children:
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        n, t, b = json.loads(data.decode() or "[0,0,1]")
        files += n
        total += t
        bad += b
    secs = time.monotonic() - t0
    print(json.dumps({"files": files, "bytes": total, "errors": bad, "seconds": secs}))
    return 1 if bad else 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "create" and len(argv) == 5:
        create(argv[2], int(argv[3]), int(argv[4]))
        return 0
    if len(argv) >= 2 and argv[1] == "list" and len(argv) == 6:
        make_list(argv[2], int(argv[3]), int(argv[4]), argv[5])
        return 0
    if len(argv) >= 2 and argv[1] == "read" and len(argv) == 4:
        return read(argv[2], int(argv[3]))
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
