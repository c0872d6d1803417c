//! `kmsfs fsck` end to end, through the CLI binary and real FUSE mounts:
//! a volume written through a mount, damage staged by hand in the backing
//! directory (each crash window and leftover fsck knows), found, repaired,
//! and the repaired files read back through a mount. Fails (never skips)
//! without FUSE.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;

use common::{pattern, TestFs};
use serde_json::Value;

/// `kmsfs fsck BACKING ARGS`: exit code, stdout, stderr.
fn fsck(fs: &TestFs, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["fsck", fs.backing.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = common::run(&all, false);
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kmsfs fsck BACKING ARGS --json`: exit code and report.
fn fsck_json(fs: &TestFs, args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = fsck(fs, &all);
    let report = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("fsck printed no JSON ({e}): {out}\n{err}"));
    (code, report)
}

/// The (kind, path) of every problem of a report, notes left out.
fn problems(report: &Value) -> Vec<(String, String)> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] != "pending_recovery")
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_owned(),
                p["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn has(list: &[(String, String)], kind: &str, path: &str) -> bool {
    list.iter().any(|(k, p)| k == kind && p == path)
}

/// The files written through the mount: name and contents.
fn contents() -> Vec<(&'static str, Vec<u8>)> {
    ["a", "b", "c", "e", "orph", "torn", "mv1", "keep"]
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, pattern(10_000 + i, i as u64 + 1)))
        .collect()
}

fn swap(a: &Path, b: &Path) {
    let tmp = a.with_extension("swap");
    std::fs::rename(a, &tmp).unwrap();
    std::fs::rename(b, a).unwrap();
    std::fs::rename(&tmp, b).unwrap();
}

#[test]
fn fsck_finds_and_repairs_staged_damage() {
    let mut fs = TestFs::new(&[]);
    std::fs::create_dir(fs.path("d")).unwrap();
    for (name, data) in contents() {
        std::fs::write(fs.path(&format!("d/{name}")), &data).unwrap();
    }

    // A clean volume, checked read-only while it is mounted.
    let (code, out, err) = fsck(&fs, &["--verify"]);
    assert_eq!(code, 0, "a clean volume: {out}\n{err}");
    assert!(out.contains("0 problems found"), "{out}");
    // A repair is refused while it is mounted, naming the mount.
    let (code, _, err) = fsck(&fs, &["--repair"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("mounted at {}", fs.mnt.display())) && err.contains("unmount"),
        "{err}"
    );
    fs.umount();

    // The damage, as crashes and hands leave it.
    let d = |n: &str| fs.backing_path(&format!("d/{n}"));
    std::fs::remove_file(d("orph")).unwrap(); // unlink after the data
    std::fs::remove_file(d(".kmsfs.c")).unwrap(); // data without a header
    std::fs::write(d(".kmsfs.e"), b"not a header at all").unwrap();
    // Two whole 4132-byte sealed blocks and 10 bytes of a third.
    let torn = std::fs::OpenOptions::new()
        .write(true)
        .open(d("torn"))
        .unwrap();
    torn.set_len(2 * 4132 + 10).unwrap();
    drop(torn);
    swap(&d(".kmsfs.a"), &d(".kmsfs.b")); // a mismatched pair, twice
    std::fs::rename(d("mv1"), d("mv2")).unwrap(); // rename after the data
    std::fs::write(d(".kmsfs-lifecycle-tmp.0123456789abcdef01234567"), b"x").unwrap();
    std::fs::write(fs.backing_path(".~kmsfs-migrate.00ff"), b"y").unwrap();
    std::fs::write(fs.backing_path(".kmsfs..~kmsfs-migrate.00ff"), b"y").unwrap();
    std::fs::write(fs.backing_path(".kmsfs-config.toml.tmp-0011"), b"z").unwrap();
    // A recovery record the mount resolves: a note, not a problem.
    std::fs::write(d(".kmsfs+keep"), b"").unwrap();

    // Found, one line each.
    let (code, out, err) = fsck(&fs, &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    for line in [
        "d/.kmsfs.orph: orphan sidecar",
        "d/.kmsfs.mv1: orphan sidecar",
        "d/c: no header",
        "d/mv2: no header",
        "d/.kmsfs.e: bad sidecar",
        "d/torn: torn tail",
        "d/.kmsfs-lifecycle-tmp.0123456789abcdef01234567: leftover temporary",
        ".~kmsfs-migrate.00ff: leftover temporary",
        ".kmsfs-config.toml.tmp-0011: leftover temporary",
        "d/.kmsfs+keep: note: ",
    ] {
        assert!(out.contains(line), "no line {line:?} in:\n{out}");
    }
    assert!(out.contains("9 problems found"), "{out}");
    // --verify finds the pairs, and which header is whose.
    let (code, report) = fsck_json(&fs, &["--verify"]);
    assert_eq!(code, 1);
    let found = problems(&report);
    assert!(has(&found, "mismatched_pair", "d/a"), "{report:#}");
    assert!(has(&found, "mismatched_pair", "d/b"), "{report:#}");
    let right = |path: &str| {
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["path"] == path && p["right_pair"].is_string())
            .map(|p| p["right_pair"].as_str().unwrap().to_owned())
    };
    assert_eq!(right("d/a").as_deref(), Some("d/.kmsfs.b"));
    assert_eq!(right("d/mv2").as_deref(), Some("d/.kmsfs.mv1"));
    assert_eq!(found.len(), 11, "{report:#}");

    // Repaired where safe; the data without a header is left (exit 4).
    let (code, out, err) = fsck(&fs, &["--repair", "--verify"]);
    assert_eq!(code, 4, "{out}\n{err}");
    assert!(
        out.contains("11 problems found, 9 repaired, 2 left"),
        "{out}"
    );
    assert!(
        out.contains("d/c: no header") && out.contains("[left: "),
        "{out}"
    );
    for gone in [
        "d/.kmsfs.orph",
        "d/.kmsfs.mv1",
        "d/.kmsfs-lifecycle-tmp.0123456789abcdef01234567",
        ".~kmsfs-migrate.00ff",
        ".kmsfs..~kmsfs-migrate.00ff",
        ".kmsfs-config.toml.tmp-0011",
    ] {
        assert!(!fs.backing_path(gone).exists(), "{gone} is still there");
    }
    assert!(d("c").exists(), "data without a header was deleted");
    assert!(d(".kmsfs+keep").exists(), "a recovery record was removed");

    // Again: only what cannot be repaired.
    let (code, report) = fsck_json(&fs, &["--verify"]);
    assert_eq!(code, 1);
    let left = problems(&report);
    assert_eq!(left.len(), 2, "{report:#}");
    assert!(has(&left, "missing_header", "d/c"), "{report:#}");
    assert!(has(&left, "bad_sidecar", "d/.kmsfs.e"), "{report:#}");

    // The repaired files read back through a mount.
    fs.mount(&[]);
    let all = contents();
    let data = |n: &str| all.iter().find(|(m, _)| *m == n).unwrap().1.clone();
    for (name, want) in [
        ("a", data("a")),
        ("b", data("b")),
        ("mv2", data("mv1")),
        ("keep", data("keep")),
    ] {
        assert_eq!(
            std::fs::read(fs.path(&format!("d/{name}"))).unwrap(),
            want,
            "d/{name}"
        );
    }
    assert_eq!(
        std::fs::read(fs.path("d/torn")).unwrap(),
        data("torn")[..8192],
        "the torn file keeps its whole blocks"
    );
    assert!(
        std::fs::read(fs.path("d/c")).is_err(),
        "data without a header reads"
    );
}

#[test]
fn repair_and_mount_exclude_each_other() {
    let mut fs = TestFs::new(&[]);
    std::fs::write(fs.path("f"), b"hello").unwrap();
    fs.umount();
    let lock_path = fs.backing_path(".kmsfs-volume.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    // Held shared, as a mount elsewhere holds it: no repair.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH) }, 0);
    let (code, _, err) = fsck(&fs, &["--repair"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by a kmsfs mount"), "{err}");
    // Held exclusively, as a repair holds it: no mount.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = common::run(
        &[
            "mount",
            fs.backing.to_str().unwrap(),
            fs.mnt.to_str().unwrap(),
            "--log-file",
            fs.log.to_str().unwrap(),
        ],
        false,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fsck --repair"), "{err}");
    drop(lock);
    // Free again: a clean repair, then a mount.
    let (code, out, err) = fsck(&fs, &["--repair"]);
    assert_eq!(code, 0, "{out}\n{err}");
    fs.mount(&[]);
    assert_eq!(std::fs::read(fs.path("f")).unwrap(), b"hello");
}
