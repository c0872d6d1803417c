//! A randomized model test: seeded random file-system operations run on a
//! kmsfs mount and on a plain directory, by several threads in several
//! processes, and every result compared.
//!
//! Each worker (a thread of a process) owns a directory of its own and runs
//! every operation on both trees in turn: results (data, sizes, errnos) and
//! the final trees must match exactly. Meanwhile other workers share a few
//! files on the mount only (writes, reads and truncates racing), where the
//! invariants are checked instead: no error at all (so never EIO), and every
//! byte read is zero or one some writer wrote.
//!
//! `KMSFS_MODEL_SEED` sets the seed (printed at the start; a failure names it
//! with the worker and operation), `KMSFS_MODEL_OPS` the total operation
//! count (default 120,000).

mod common;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PROCESSES: usize = 2;
const OWNED_THREADS: usize = 3;
const SHARED_THREADS: usize = 2;
const DEFAULT_OPS: u64 = 120_000;
const SHARED_FILES: usize = 3;
/// Largest offset or size the operations use: a few 4 KiB blocks, so that
/// most writes and truncates land mid-block.
const SPAN: u64 = 3 * 4096 + 1000;
const FILES: [&str; 8] = ["f0", "f1", "f2", "f3", "f4", "d0/f5", "d0/f6", "d1/f7"];
const DIRS: [&str; 3] = ["d0", "d1", "d0/e"];
const MAX_OPEN: usize = 4;

const CHILD_ENV: &str = "KMSFS_MODEL_CHILD";

/// splitmix64: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, list: &[&'a str]) -> &'a str {
        list[self.below(list.len() as u64) as usize]
    }
    /// 1 to `max` random bytes.
    fn data(&mut self, max: u64) -> Vec<u8> {
        let len = 1 + self.below(max) as usize;
        self.bytes(len)
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// What an operation returned: its data, or the errno.
type Outcome = Result<Vec<u8>, i32>;

fn errno(e: io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("an error without an errno: {e}"))
}

fn ok_or_errno<T>(r: io::Result<T>, f: impl FnOnce(T) -> Vec<u8>) -> Outcome {
    r.map(f).map_err(errno)
}

fn describe(o: &Outcome) -> String {
    match o {
        Ok(v) if v.len() <= 32 => format!("Ok({:?})", String::from_utf8_lossy(v)),
        Ok(v) => format!("Ok({} bytes, fnv {:016x})", v.len(), fnv(v)),
        Err(e) => format!("Err({})", io::Error::from_raw_os_error(*e)),
    }
}

fn fnv(v: &[u8]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Reads `len` bytes at `offset` until EOF, as a program reading a file would.
fn read_at(f: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Maps the first 64 KiB of `f` shared, returns what it holds, and with
/// `write`, stores those bytes at that offset (wrapped into the mapping)
/// and msyncs.
fn mmap_op(f: &File, write: Option<(u64, &[u8])>) -> Outcome {
    let size = f.metadata().map_err(errno)?.len();
    if size == 0 {
        return Ok(b"empty".to_vec());
    }
    let len = size.min(65536) as usize;
    // SAFETY: a fresh shared mapping of a file only this worker changes,
    // within its size; unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(errno(io::Error::last_os_error()));
        }
        let before = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        let mut r = Ok(before);
        if let Some((offset, data)) = write {
            let at = (offset as usize) % len;
            let n = data.len().min(len - at);
            std::ptr::copy_nonoverlapping(data.as_ptr(), (p as *mut u8).add(at), n);
            if libc::msync(p, len, libc::MS_SYNC) != 0 {
                r = Err(errno(io::Error::last_os_error()));
            }
        }
        libc::munmap(p, len);
        r
    }
}

/// An open file in both trees: opened by the same name, so it follows the
/// same object through renames and unlinks.
struct OpenPair {
    name: &'static str,
    fs: File,
    plain: File,
}

/// One worker owning `dir` in both trees.
struct Owned {
    who: String,
    fs: PathBuf,
    plain: PathBuf,
    rng: Rng,
    open: Vec<OpenPair>,
    recent: VecDeque<String>,
    ops: u64,
}

impl Owned {
    fn both(&mut self, what: String, op: impl Fn(&Path) -> Outcome) {
        let a = op(&self.fs);
        let b = op(&self.plain);
        self.check(what, a, b);
    }

    fn both_open(&mut self, i: usize, what: String, op: impl Fn(&File) -> Outcome) {
        let a = op(&self.open[i].fs);
        let b = op(&self.open[i].plain);
        let what = format!("{what} on the handle opened as {}", self.open[i].name);
        self.check(what, a, b);
    }

    fn check(&mut self, what: String, fs: Outcome, plain: Outcome) {
        self.ops += 1;
        if self.recent.len() == 20 {
            self.recent.pop_front();
        }
        self.recent
            .push_back(format!("{what}: {}", describe(&plain)));
        let eio = fs == Err(libc::EIO);
        if fs != plain || eio {
            panic!(
                "{}: operation {} ({what}) differs: kmsfs {}, plain directory {}\n\
                 the operations before it (plain results):\n  {}",
                self.who,
                self.ops,
                describe(&fs),
                describe(&plain),
                self.recent.iter().cloned().collect::<Vec<_>>().join("\n  ")
            );
        }
    }

    fn step(&mut self) {
        let r = &mut self.rng;
        let name = r.pick(&FILES);
        let choice = r.below(100);
        match choice {
            // Create (or open) and write at an offset.
            0..=9 => {
                let (off, data, trunc) = (r.below(SPAN), r.data(9000), r.below(4) == 0);
                self.both(
                    format!(
                        "write {} bytes at {off} to {name} (create, trunc {trunc})",
                        data.len()
                    ),
                    |root| {
                        let f = OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(trunc)
                            .mode(0o644)
                            .open(root.join(name));
                        ok_or_errno(f.and_then(|f| f.write_all_at(&data, off)), |()| vec![])
                    },
                );
            }
            10..=15 => {
                self.both(format!("read {name}"), |root| {
                    ok_or_errno(fs::read(root.join(name)), |v| v)
                });
            }
            16..=20 => {
                let size = r.below(SPAN);
                self.both(format!("truncate {name} to {size}"), |root| {
                    ok_or_errno(
                        OpenOptions::new()
                            .write(true)
                            .open(root.join(name))
                            .and_then(|f| f.set_len(size)),
                        |()| vec![],
                    )
                });
            }
            21..=25 => {
                let data = r.data(5000);
                self.both(format!("append {} bytes to {name}", data.len()), |root| {
                    let f = OpenOptions::new().append(true).open(root.join(name));
                    ok_or_errno(f.and_then(|mut f| f.write_all(&data)), |()| vec![])
                });
            }
            26..=33 => {
                let to = r.pick(&FILES);
                self.both(format!("rename {name} to {to}"), |root| {
                    ok_or_errno(fs::rename(root.join(name), root.join(to)), |()| vec![])
                });
            }
            34..=37 => {
                let (from, to) = (r.pick(&DIRS), r.pick(&DIRS));
                self.both(format!("rename directory {from} to {to}"), |root| {
                    ok_or_errno(fs::rename(root.join(from), root.join(to)), |()| vec![])
                });
            }
            38..=42 => {
                self.both(format!("unlink {name}"), |root| {
                    ok_or_errno(fs::remove_file(root.join(name)), |()| vec![])
                });
            }
            43..=45 => {
                let to = r.pick(&FILES);
                self.both(format!("link {name} to {to}"), |root| {
                    ok_or_errno(fs::hard_link(root.join(name), root.join(to)), |()| vec![])
                });
            }
            46..=49 => {
                let d = r.pick(&DIRS);
                self.both(format!("mkdir {d}"), |root| {
                    ok_or_errno(fs::create_dir(root.join(d)), |()| vec![])
                });
            }
            50..=51 => {
                let d = r.pick(&DIRS);
                self.both(format!("rmdir {d}"), |root| {
                    ok_or_errno(fs::remove_dir(root.join(d)), |()| vec![])
                });
            }
            // syncfs reports writeback errors the kernel recorded on the
            // mount, such as a failed write-back of cached times.
            52 => {
                self.both("syncfs".into(), |root| {
                    let synced = File::open(root).and_then(|d| {
                        // SAFETY: a valid descriptor, owned by `d`.
                        match unsafe { libc::syncfs(d.as_raw_fd()) } {
                            0 => Ok(()),
                            _ => Err(io::Error::last_os_error()),
                        }
                    });
                    ok_or_errno(synced, |()| b"synced".to_vec())
                });
            }
            53..=55 => {
                self.both(format!("stat {name}"), |root| {
                    ok_or_errno(fs::symlink_metadata(root.join(name)), |m| {
                        format!(
                            "{:?} {} {} {:o}",
                            m.file_type(),
                            m.len(),
                            m.nlink(),
                            m.mode()
                        )
                        .into_bytes()
                    })
                });
            }
            // Open a handle kept across later renames and unlinks.
            56..=61 => {
                if self.open.len() >= MAX_OPEN {
                    let i = r.below(self.open.len() as u64) as usize;
                    self.open.swap_remove(i);
                }
                let fs_file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.fs.join(name));
                let plain_file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.plain.join(name));
                match (fs_file, plain_file) {
                    (Ok(fs), Ok(plain)) => {
                        self.check(format!("open {name}"), Ok(vec![]), Ok(vec![]));
                        self.open.push(OpenPair { name, fs, plain });
                    }
                    (a, b) => self.check(
                        format!("open {name}"),
                        a.map(|_| vec![]).map_err(errno),
                        b.map(|_| vec![]).map_err(errno),
                    ),
                }
            }
            _ if self.open.is_empty() => {
                self.both(format!("read {name}"), |root| {
                    ok_or_errno(fs::read(root.join(name)), |v| v)
                });
            }
            _ => {
                let i = r.below(self.open.len() as u64) as usize;
                match choice {
                    62..=71 => {
                        let (off, data) = (r.below(SPAN), r.data(9000));
                        self.both_open(i, format!("pwrite {} bytes at {off}", data.len()), |f| {
                            ok_or_errno(f.write_all_at(&data, off), |()| vec![])
                        });
                    }
                    72..=79 => {
                        let (off, len) = (r.below(SPAN), 1 + r.below(9000) as usize);
                        self.both_open(i, format!("pread {len} bytes at {off}"), |f| {
                            ok_or_errno(read_at(f, off, len), |v| v)
                        });
                    }
                    80..=84 => {
                        let size = r.below(SPAN);
                        self.both_open(i, format!("ftruncate to {size}"), |f| {
                            ok_or_errno(f.set_len(size), |()| vec![])
                        });
                    }
                    85..=87 => {
                        self.both_open(i, "fsync".into(), |f| {
                            ok_or_errno(f.sync_all(), |()| vec![])
                        });
                    }
                    88..=90 => {
                        self.both_open(i, "mmap read".into(), |f| mmap_op(f, None));
                    }
                    91..=94 => {
                        let (off, data) = (r.below(65536), r.data(3000));
                        self.both_open(
                            i,
                            format!("mmap write {} bytes at {off} and msync", data.len()),
                            |f| mmap_op(f, Some((off, &data))),
                        );
                    }
                    95..=96 => {
                        self.both_open(i, "fstat".into(), |f| {
                            ok_or_errno(f.metadata(), |m| {
                                format!("{} {}", m.len(), m.nlink()).into_bytes()
                            })
                        });
                    }
                    _ => {
                        self.open.swap_remove(i);
                    }
                }
            }
        }
    }
}

/// A sorted listing of `root` with each file's contents: what the two
/// trees must agree on at the end.
fn tree(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.push((rel, "dir".into()));
                stack.push(p);
            } else {
                let data = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                out.push((
                    rel,
                    format!(
                        "file nlink {} {} bytes fnv {:016x}",
                        m.nlink(),
                        data.len(),
                        fnv(&data)
                    ),
                ));
            }
        }
    }
    out.sort();
    out
}

fn run_owned(who: String, fs_root: &Path, plain_root: &Path, seed: u64, ops: u64) -> u64 {
    let (fs, plain) = (fs_root.join(&who), plain_root.join(&who));
    fs::create_dir(&fs).unwrap();
    fs::create_dir(&plain).unwrap();
    let mut w = Owned {
        rng: Rng(seed),
        who,
        fs,
        plain,
        open: Vec::new(),
        recent: VecDeque::new(),
        ops: 0,
    };
    while w.ops < ops {
        w.step();
    }
    // Handles still open keep unlinked files alive; close them first.
    w.open.clear();
    let (a, b) = (tree(&w.fs), tree(&w.plain));
    assert_eq!(
        a, b,
        "{}: the final trees differ (left kmsfs, right plain)",
        w.who
    );
    w.ops
}

/// A byte some shared writer may have written; zero is what a hole or an
/// extending truncate reads as.
fn shared_byte(b: u8) -> bool {
    b == 0 || b.is_ascii_uppercase()
}

fn shared_file(root: &Path, i: u64) -> PathBuf {
    root.join("shared").join(format!("s{i}"))
}

/// Writes, reads and truncates the shared files (on the mount only), racing
/// the other shared workers. Any error fails: none is expected.
fn run_shared(who: String, fs_root: &Path, seed: u64, ops: u64, letter: u8) -> u64 {
    let mut r = Rng(seed);
    let files: Vec<File> = (0..SHARED_FILES as u64)
        .map(|i| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(shared_file(fs_root, i))
                .unwrap_or_else(|e| panic!("{who}: open shared file s{i}: {e}"))
        })
        .collect();
    let fail = |n: u64, what: &str, e: io::Error| -> ! {
        panic!("{who}: shared operation {n} ({what}) failed: {e} (no error is expected here)")
    };
    for n in 0..ops {
        let i = r.below(SHARED_FILES as u64);
        let f = &files[i as usize];
        match r.below(10) {
            0..=3 => {
                let (off, len) = (r.below(SPAN), 1 + r.below(9000) as usize);
                if let Err(e) = f.write_all_at(&vec![letter; len], off) {
                    fail(n, &format!("pwrite {len} at {off} to s{i}"), e);
                }
            }
            4..=6 => {
                let (off, len) = (r.below(SPAN), 1 + r.below(9000) as usize);
                match read_at(f, off, len) {
                    Ok(v) => {
                        if let Some(p) = v.iter().position(|b| !shared_byte(*b)) {
                            panic!("{who}: shared operation {n}: s{i} byte {} reads {:#04x}, which no writer wrote", off + p as u64, v[p]);
                        }
                    }
                    Err(e) => fail(n, &format!("pread {len} at {off} from s{i}"), e),
                }
            }
            7..=8 => {
                let size = r.below(SPAN);
                if let Err(e) = f.set_len(size) {
                    fail(n, &format!("ftruncate s{i} to {size}"), e);
                }
            }
            _ => {
                if let Err(e) = f.sync_data() {
                    fail(n, &format!("fdatasync s{i}"), e);
                }
            }
        }
    }
    ops
}

/// One process's share: owned and shared workers on threads; returns the
/// operations done.
fn run_process(proc: usize, fs_root: &Path, plain_root: &Path, seed: u64, per_worker: u64) -> u64 {
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for t in 0..OWNED_THREADS {
            let who = format!("w{proc}.{t}");
            let wseed = seed ^ (((proc * 16 + t) as u64 + 1) << 40);
            handles.push(s.spawn(move || run_owned(who, fs_root, plain_root, wseed, per_worker)));
        }
        for t in 0..SHARED_THREADS {
            let who = format!("shared{proc}.{t}");
            let wseed = seed ^ (((proc * 16 + t) as u64 + 1) << 48);
            let letter = b'A' + ((proc * SHARED_THREADS + t) % 26) as u8;
            handles.push(s.spawn(move || run_shared(who, fs_root, wseed, per_worker, letter)));
        }
        let mut total = 0;
        let mut panics = Vec::new();
        for h in handles {
            match h.join() {
                Ok(n) => total += n,
                Err(p) => panics.push(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                ),
            }
        }
        assert!(panics.is_empty(), "process {proc}: {}", panics.join("\n"));
        total
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

#[test]
fn model_matches_a_plain_directory() {
    let seed = env_u64("KMSFS_MODEL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let total = env_u64("KMSFS_MODEL_OPS").unwrap_or(DEFAULT_OPS);
    let workers = (PROCESSES * (OWNED_THREADS + SHARED_THREADS)) as u64;
    let per_worker = total.div_ceil(workers);
    eprintln!(
        "model: seed {seed} (rerun with KMSFS_MODEL_SEED={seed}), {total} operations: \
         {PROCESSES} processes x ({OWNED_THREADS} owned + {SHARED_THREADS} shared threads), \
         {per_worker} each"
    );
    let mount = common::TestFs::new(&[]);
    let plain = common::tempdir("kmsfs-model-plain");
    let (fs_root, plain_root) = (mount.path("model"), plain.path().join("model"));
    fs::create_dir(&fs_root).unwrap();
    fs::create_dir(&plain_root).unwrap();
    fs::create_dir(fs_root.join("shared")).unwrap();
    for i in 0..SHARED_FILES as u64 {
        File::create(shared_file(&fs_root, i)).unwrap();
    }

    let started = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|p| {
            Command::new(&exe)
                .args([
                    "model_process_worker",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("{p}"))
                .env("KMSFS_MODEL_FS_ROOT", &fs_root)
                .env("KMSFS_MODEL_PLAIN_ROOT", &plain_root)
                .env("KMSFS_MODEL_WORKER_SEED", seed.to_string())
                .env("KMSFS_MODEL_PER_WORKER", per_worker.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start a model worker process")
        })
        .collect();
    let mut done = 0;
    let mut failures = Vec::new();
    for (p, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ops = stdout
            .lines()
            // The harness prints its "test ... " prefix on the same line.
            .find_map(|l| l.split_once("model-ops: ").map(|(_, n)| n))
            .and_then(|n| n.trim().parse::<u64>().ok());
        match ops {
            Some(n) if out.status.success() => done += n,
            _ => failures.push(format!(
                "process {p} ({}):\n{}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "model (seed {seed}; rerun with KMSFS_MODEL_SEED={seed}) failed:\n{}",
        failures.join("\n")
    );
    // The shared files must still read whole, with only written bytes.
    for i in 0..SHARED_FILES as u64 {
        let data = fs::read(shared_file(&fs_root, i))
            .unwrap_or_else(|e| panic!("read shared file s{i} at the end: {e}"));
        assert!(
            data.iter().all(|b| shared_byte(*b)),
            "shared file s{i} holds bytes no writer wrote"
        );
    }
    assert!(done >= total, "only {done} of {total} operations ran");
    let log = mount.log_text();
    assert!(
        !log.contains("ERROR"),
        "the daemon logged errors during the model run:\n{log}"
    );
    eprintln!(
        "model: {done} operations matched in {:.1}s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
}

/// A model worker process when started by `model_matches_a_plain_directory`
/// (with its environment); run directly, a short single-process model of two
/// plain directories, which checks the model itself: identical trees give
/// identical results.
#[test]
fn model_process_worker() {
    let Ok(proc) = std::env::var(CHILD_ENV) else {
        let a = common::tempdir("kmsfs-model-self-a");
        let b = common::tempdir("kmsfs-model-self-b");
        fs::create_dir(a.path().join("shared")).unwrap();
        for i in 0..SHARED_FILES as u64 {
            File::create(shared_file(a.path(), i)).unwrap();
        }
        let ops = run_process(0, a.path(), b.path(), 7, 2000);
        assert_eq!(ops, 2000 * (OWNED_THREADS + SHARED_THREADS) as u64);
        return;
    };
    let proc: usize = proc.parse().expect("process index");
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set"));
    let fs_root = PathBuf::from(var("KMSFS_MODEL_FS_ROOT"));
    let plain_root = PathBuf::from(var("KMSFS_MODEL_PLAIN_ROOT"));
    let seed: u64 = var("KMSFS_MODEL_WORKER_SEED").parse().unwrap();
    let per_worker: u64 = var("KMSFS_MODEL_PER_WORKER").parse().unwrap();
    let ops = run_process(proc, &fs_root, &plain_root, seed, per_worker);
    println!("model-ops: {ops}");
}
