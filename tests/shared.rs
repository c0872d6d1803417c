//! Many nodes on one backing directory (`-o shared`, docs/MOUNTING.md
//! "Shared mounts"): every case runs twice, on two mounts of one backing
//! directory on this machine (`_local`) and on one mount over each of two
//! GlusterFS client mounts of one volume (`_gluster`: separate kmsfs
//! processes, one trusted configuration and keyring). GlusterFS comes from
//! scripts/dev-gluster.sh; a test fails, never skips, when it cannot.
//!
//! What is checked is what `-o shared` promises: close-to-open consistency
//! of sizes and bytes, creates/renames/removals seen within the attribute
//! timeout, `O_EXCL` meaning one winner, writes to different blocks of one
//! file kept, and `fcntl` locks excluding each other across nodes.

mod common;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use common::nodes::{exists, settle, Kind, Node, Pair};
use common::pattern;
use sha2::{Digest, Sha256};

/// Runs `$body(Kind)` as two tests, `$name::local` and `$name::gluster`.
macro_rules! both {
    ($($name:ident => $body:ident;)*) => {
        $(
            mod $name {
                #[test]
                fn local() {
                    super::$body(super::Kind::Local)
                }
                #[test]
                fn gluster() {
                    super::$body(super::Kind::Gluster)
                }
            }
        )*
    };
}

both! {
    write_close_then_open_on_the_other_node => write_close_open;
    overwrite_in_place_is_seen_by_a_later_open => overwrite_in_place;
    append_on_b_is_seen_on_a => append_on_b;
    rename_on_a_is_seen_on_b => rename_on_a;
    unlink_on_a_is_seen_on_b => unlink_on_a;
    concurrent_creates_from_both_nodes => concurrent_creates;
    o_excl_has_one_winner_across_nodes => o_excl_race;
    different_blocks_of_one_file_from_two_nodes => interleaved_blocks;
    fcntl_lock_on_a_blocks_b => fcntl_lock;
    ml_read_by_both_nodes => ml_read;
}

fn read(node: &Node, rel: &str) -> Vec<u8> {
    fs::read(node.path(rel)).unwrap_or_else(|e| panic!("node {}: read {rel}: {e}", node.name))
}

/// Asserts that `rel` has exactly `want` through `node`: by stat and by a
/// fresh open.
fn assert_content(pair: &Pair, node: &Node, rel: &str, want: &[u8]) {
    let len = fs::metadata(node.path(rel))
        .unwrap_or_else(|e| panic!("node {}: stat {rel}: {e}", node.name))
        .len();
    let got = read(node, rel);
    if len != want.len() as u64 || got != want {
        let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "node {} ({:?}): {rel} is stale or wrong: stat size {len}, read {} bytes, want {} \
             (first differing byte: {first_diff:?})\n{}",
            node.name,
            pair.kind,
            got.len(),
            want.len(),
            pair.logs()
        );
    }
}

fn write_close_open(kind: Kind) {
    let pair = Pair::new(kind);
    let a_data = pattern(300_001, 1);
    fs::write(pair.a.path("from-a"), &a_data).unwrap();
    assert_content(&pair, &pair.b, "from-a", &a_data);
    let b_data = pattern(5_000, 2);
    fs::write(pair.b.path("from-b"), &b_data).unwrap();
    assert_content(&pair, &pair.a, "from-b", &b_data);
    // A directory and a file in it, made on B, read on A.
    fs::create_dir(pair.b.path("dir")).unwrap();
    fs::write(pair.b.path("dir/x"), b"in a directory").unwrap();
    assert_content(&pair, &pair.a, "dir/x", b"in a directory");
}

fn overwrite_in_place(kind: Kind) {
    let pair = Pair::new(kind);
    let mut want = pattern(40_000, 3);
    fs::write(pair.a.path("f"), &want).unwrap();
    assert_content(&pair, &pair.b, "f", &want);
    for round in 0..6u64 {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(pair.a.path("f"))
            .unwrap();
        match round % 3 {
            // Same length, new bytes in the middle (across block bounds).
            0 => {
                let patch = pattern(9_000, 10 + round);
                f.write_all_at(&patch, 3_000).unwrap();
                if want.len() < 12_000 {
                    want.resize(12_000, 0);
                }
                want[3_000..12_000].copy_from_slice(&patch);
            }
            // Another length (shorter, mostly): truncated, then a few
            // bytes rewritten.
            1 => {
                let len = 4_097 + 1_000 * round as usize;
                f.set_len(len as u64).unwrap();
                want.resize(len, 0);
                f.write_all_at(b"tail", len as u64 - 4).unwrap();
                want[len - 4..].copy_from_slice(b"tail");
            }
            // Longer: written past the end.
            _ => {
                let more = pattern(20_000, 20 + round);
                f.write_all_at(&more, want.len() as u64 + 100).unwrap();
                want.resize(want.len() + 100, 0);
                want.extend_from_slice(&more);
            }
        }
        drop(f);
        assert_content(&pair, &pair.b, "f", &want);
        // And the whole file replaced through B, seen by A.
        if round == 3 {
            want = pattern(1_234, 99);
            fs::write(pair.b.path("f"), &want).unwrap();
            assert_content(&pair, &pair.a, "f", &want);
        }
    }
}

fn append_on_b(kind: Kind) {
    let pair = Pair::new(kind);
    let mut want = pattern(4_000, 4);
    fs::write(pair.a.path("log"), &want).unwrap();
    assert_content(&pair, &pair.b, "log", &want);
    for i in 0..5u64 {
        let chunk = pattern(1_000 + 3_000 * i as usize, 40 + i);
        let mut f = OpenOptions::new()
            .append(true)
            .open(pair.b.path("log"))
            .unwrap();
        f.write_all(&chunk).unwrap();
        drop(f);
        want.extend_from_slice(&chunk);
        assert_content(&pair, &pair.a, "log", &want);
    }
}

fn rename_on_a(kind: Kind) {
    let pair = Pair::new(kind);
    let data = pattern(10_000, 5);
    fs::create_dir(pair.a.path("d")).unwrap();
    fs::write(pair.a.path("d/old"), &data).unwrap();
    assert_content(&pair, &pair.b, "d/old", &data);
    fs::rename(pair.a.path("d/old"), pair.a.path("new")).unwrap();
    settle();
    assert_content(&pair, &pair.b, "new", &data);
    assert!(
        !exists(&pair.b.path("d/old")),
        "node B still sees the old name after the attribute timeout"
    );
    // Renamed over an existing file that B has read.
    fs::write(pair.a.path("target"), b"old target").unwrap();
    assert_content(&pair, &pair.b, "target", b"old target");
    fs::write(pair.a.path("tmp"), b"new target").unwrap();
    fs::rename(pair.a.path("tmp"), pair.a.path("target")).unwrap();
    settle();
    assert_content(&pair, &pair.b, "target", b"new target");
}

fn unlink_on_a(kind: Kind) {
    let pair = Pair::new(kind);
    fs::write(pair.a.path("gone"), pattern(6_000, 6)).unwrap();
    fs::create_dir(pair.a.path("dir")).unwrap();
    assert_content(&pair, &pair.b, "gone", &pattern(6_000, 6));
    assert!(exists(&pair.b.path("dir")));
    fs::remove_file(pair.a.path("gone")).unwrap();
    fs::remove_dir(pair.a.path("dir")).unwrap();
    settle();
    for rel in ["gone", "dir"] {
        let e = fs::metadata(pair.b.path(rel)).map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "node B: {rel}: {e}");
    }
    let names: Vec<_> = fs::read_dir(&pair.b.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "node B still lists {names:?}");
    // The name can be made again, on B, and A sees the new file.
    fs::write(pair.b.path("gone"), b"again").unwrap();
    settle();
    assert_content(&pair, &pair.a, "gone", b"again");
}

/// Content of file `i` written by node `side`.
fn content(side: &str, i: usize) -> Vec<u8> {
    let mut v = format!("{side}:{i}:").into_bytes();
    v.extend(pattern(
        100 + (i * 997) % 9_000,
        i as u64 + if side == "A" { 0 } else { 1 << 32 },
    ));
    v
}

fn concurrent_creates(kind: Kind) {
    const PER_THREAD: usize = 100;
    const THREADS_PER_NODE: usize = 2;
    let pair = Pair::new(kind);
    fs::create_dir(pair.a.path("cc")).unwrap();
    settle();
    let start = Arc::new(Barrier::new(2 * THREADS_PER_NODE));
    std::thread::scope(|s| {
        for (node, side) in [(&pair.a, "A"), (&pair.b, "B")] {
            for t in 0..THREADS_PER_NODE {
                let start = start.clone();
                let dir = node.path("cc");
                s.spawn(move || {
                    start.wait();
                    for k in 0..PER_THREAD {
                        let i = t * PER_THREAD + k;
                        fs::write(dir.join(format!("{side}-{i}")), content(side, i))
                            .unwrap_or_else(|e| panic!("node {side}: create {side}-{i}: {e}"));
                    }
                });
            }
        }
    });
    settle();
    let n = THREADS_PER_NODE * PER_THREAD;
    for node in pair.nodes() {
        let listed = fs::read_dir(node.path("cc")).unwrap().count();
        assert_eq!(listed, 2 * n, "node {} lists {listed} files", node.name);
        for side in ["A", "B"] {
            for i in 0..n {
                assert_content(&pair, node, &format!("cc/{side}-{i}"), &content(side, i));
            }
        }
    }
}

fn o_excl_race(kind: Kind) {
    const NAMES: usize = 150;
    let pair = Pair::new(kind);
    fs::create_dir(pair.a.path("x")).unwrap();
    settle();
    let start = Arc::new(Barrier::new(2));
    let winners: Vec<Vec<usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = [(&pair.a, "A"), (&pair.b, "B")]
            .into_iter()
            .map(|(node, side)| {
                let start = start.clone();
                let dir = node.path("x");
                s.spawn(move || {
                    let mut won = Vec::new();
                    start.wait();
                    for i in 0..NAMES {
                        match OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o644)
                            .open(dir.join(format!("n{i}")))
                        {
                            Ok(mut f) => {
                                f.write_all(&content(side, i)).unwrap_or_else(|e| {
                                    panic!("node {side}: write the won n{i}: {e}")
                                });
                                won.push(i);
                            }
                            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                            Err(e) => panic!("node {side}: create n{i} with O_EXCL: {e}"),
                        }
                    }
                    won
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut winner: HashMap<usize, &str> = HashMap::new();
    for (side, won) in ["A", "B"].into_iter().zip(&winners) {
        for &i in won {
            if let Some(other) = winner.insert(i, side) {
                panic!("n{i}: both {other} and {side} won O_EXCL\n{}", pair.logs());
            }
        }
    }
    let missing: Vec<_> = (0..NAMES).filter(|i| !winner.contains_key(i)).collect();
    assert!(missing.is_empty(), "no node won {missing:?}");
    settle();
    for node in pair.nodes() {
        for (&i, side) in &winner {
            assert_content(&pair, node, &format!("x/n{i}"), &content(side, i));
        }
    }
}

fn interleaved_blocks(kind: Kind) {
    const BLOCK: usize = 4096;
    const BLOCKS: usize = 64;
    let pair = Pair::new(kind);
    let f = pair.a.path("blocks");
    fs::write(&f, vec![0u8; BLOCK * BLOCKS]).unwrap();
    assert_content(&pair, &pair.b, "blocks", &vec![0u8; BLOCK * BLOCKS]);
    let block = |k: usize| pattern(BLOCK, 1_000 + k as u64);
    // Both files stay open while A writes the even blocks and B the odd
    // ones, in turns (block 0 on A, 1 on B, 2 on A, ...).
    let fa = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(pair.b.path("blocks"))
        .unwrap();
    for round in 0..2 {
        for k in 0..BLOCKS {
            // The second round in the opposite order.
            let k = if round == 0 { k } else { BLOCKS - 1 - k };
            let file = if k % 2 == 0 { &fa } else { &fb };
            file.write_all_at(&block(k), (k * BLOCK) as u64)
                .unwrap_or_else(|e| panic!("pwrite block {k}: {e}"));
        }
    }
    fa.sync_all().unwrap();
    fb.sync_all().unwrap();
    drop((fa, fb));
    let want: Vec<u8> = (0..BLOCKS).flat_map(block).collect();
    for node in pair.nodes() {
        let got = read(node, "blocks");
        assert_eq!(got.len(), want.len(), "node {}: length", node.name);
        for k in 0..BLOCKS {
            assert!(
                got[k * BLOCK..(k + 1) * BLOCK] == want[k * BLOCK..(k + 1) * BLOCK],
                "node {}: block {k} is not what node {} wrote\n{}",
                node.name,
                if k % 2 == 0 { "A" } else { "B" },
                pair.logs()
            );
        }
    }
}

/// `fcntl(F_SETLK)` of a whole-file lock of `kind` (F_RDLCK, F_WRLCK,
/// F_UNLCK) on `f`.
fn setlk(f: &fs::File, kind: libc::c_int) -> std::io::Result<()> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn fcntl_lock(kind: Kind) {
    let pair = Pair::new(kind);
    fs::write(pair.a.path("lockme"), b"data").unwrap();
    let open = |node: &Node| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(node.path("lockme"))
            .unwrap()
    };
    let (fa, fb) = (open(&pair.a), open(&pair.b));
    setlk(&fa, libc::F_WRLCK).expect("write lock through A");
    for (what, k) in [("write", libc::F_WRLCK), ("read", libc::F_RDLCK)] {
        let e = setlk(&fb, k).expect_err(&format!(
            "a {what} lock through B was granted while A holds a write lock"
        ));
        assert!(
            matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)),
            "{what} lock through B: {e} (expected EAGAIN)"
        );
    }
    setlk(&fa, libc::F_UNLCK).unwrap();
    setlk(&fb, libc::F_WRLCK).expect("B's lock once A has let go");
    let e = setlk(&fa, libc::F_RDLCK).expect_err("A's lock granted while B holds one");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)),
        "A: {e}"
    );
    // Closing B's file releases its lock.
    drop(fb);
    setlk(&fa, libc::F_WRLCK).expect("A's lock once B closed its file");
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn ml_read(kind: Kind) {
    const FILES: usize = 2000;
    // GlusterFS serves about 150 small reads a second here: one reader per
    // node there keeps the test short.
    let readers_per_node = if kind == Kind::Gluster { 1 } else { 2 };
    let pair = Pair::new(kind);
    let rel = |i: usize| format!("ml/d{:02}/f{i:05}.bin", i / 250);
    let mut sums = Vec::with_capacity(FILES);
    for i in 0..FILES {
        if i % 250 == 0 {
            fs::create_dir_all(pair.a.path(&rel(i)).parent().unwrap()).unwrap();
        }
        let data = pattern(1_000 + (i * 7_919) % 15_000, 7_000 + i as u64);
        sums.push(sha256(&data));
        fs::write(pair.a.path(&rel(i)), &data).unwrap();
    }
    settle();
    let sums = &sums;
    let start = Arc::new(Barrier::new(2 * readers_per_node));
    let bad: Vec<String> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for node in pair.nodes() {
            for r in 0..readers_per_node {
                let start = start.clone();
                let root: PathBuf = node.mnt.clone();
                let name = node.name;
                handles.push(s.spawn(move || {
                    start.wait();
                    let mut bad = Vec::new();
                    // Every reader reads every file, each in its own order.
                    for k in 0..FILES {
                        let i = (k * 7 + r * 1_013) % FILES;
                        match fs::read(root.join(rel(i))) {
                            Ok(d) if sha256(&d) == sums[i] => {}
                            Ok(d) => bad.push(format!(
                                "node {name}: {} bad checksum ({} bytes)",
                                rel(i),
                                d.len()
                            )),
                            Err(e) => bad.push(format!("node {name}: {}: {e}", rel(i))),
                        }
                    }
                    bad
                }));
            }
        }
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(
        bad.is_empty(),
        "{} failed reads, first: {:?}\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        pair.logs()
    );
}

/// Without `-o shared`, a second mount of a backing directory that a node
/// has mounted is refused, naming `-o shared`: on another node too (over
/// GlusterFS, which carries flock between its clients).
#[test]
fn without_shared_a_second_node_is_refused_gluster() {
    let mut pair = Pair::unmounted(Kind::Gluster);
    pair.a.mount("", true);
    for opts in ["", "ro", "shared"] {
        let out = pair.b.mount(opts, false);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "node B mounted with -o {opts:?} beside a lone read-write mount on node A"
        );
        assert!(
            err.contains("-o shared"),
            "-o {opts:?}: the refusal does not name -o shared: {err}"
        );
    }
    // With -o shared on both, it is served by both.
    pair.a.umount();
    let opts = common::nodes::shared_options();
    pair.a.mount(&opts, true);
    pair.b.mount(&opts, true);
    fs::write(pair.a.path("f"), b"both").unwrap();
    assert_eq!(read(&pair.b, "f"), b"both");
    assert!(Path::new(&pair.b.mnt).exists());
}
