//! `kmsfs migrate DIR` and `kmsfs migrate --rollback DIR`: a plaintext tree
//! encrypted in place and decrypted back, also when killed midway; checked
//! through a real mount (FUSE needed: these tests fail without it).

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{pattern, run, run_with, wait_for_daemon_exit, Places};

/// What a tree holds, as compared before and after: per relative path, its
/// kind and contents (or symlink target), permission bits, mtime and
/// user xattrs.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Entry {
    kind: &'static str,
    data: Vec<u8>,
    mode: u32,
    mtime: i64,
    xattrs: BTreeMap<String, Vec<u8>>,
}

type Snapshot = BTreeMap<String, Entry>;

fn lgetxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| {
        buf.truncate(r as usize);
        buf
    })
}

fn setxattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn set_mtime(path: &Path, secs: i64) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0);
}

/// The user-visible tree below `root` (names starting with .kmsfs are left
/// out when `hide_reserved`, as a mount hides them).
fn snapshot(root: &Path, hide_reserved: bool) -> Snapshot {
    let mut out = Snapshot::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if hide_reserved && name.as_bytes().starts_with(b".kmsfs") {
                continue;
            }
            let rel = rel.join(&name);
            let path = root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let (kind, data) = if meta.is_dir() {
                pending.push(rel.clone());
                ("dir", Vec::new())
            } else if meta.file_type().is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else {
                ("file", std::fs::read(&path).unwrap())
            };
            let xattrs = ["user.origin"]
                .iter()
                .filter(|_| kind == "file")
                .filter_map(|n| lgetxattr(&path, n).map(|v| (n.to_string(), v)))
                .collect();
            out.insert(
                rel.to_string_lossy().into_owned(),
                Entry {
                    kind,
                    data,
                    mode: meta.permissions().mode() & 0o7777,
                    mtime: if kind == "dir" { 0 } else { meta.mtime() },
                    xattrs,
                },
            );
        }
    }
    out
}

/// A plaintext tree: nested directories, files of several sizes (empty,
/// one block, several blocks), odd modes, old times, a symlink, an xattr;
/// plus `extra` small files.
fn plant(root: &Path, extra: usize) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    let files: [(&str, usize, u32); 6] = [
        ("a.txt", 11, 0o644),
        ("empty", 0, 0o600),
        ("one-block", 4096, 0o640),
        ("sub/multi", 3 * 4096 + 17, 0o755),
        ("sub/deeper/big", 300_000, 0o444),
        ("sub/setgid", 5, 0o2750),
    ];
    for (i, (name, len, mode)) in files.iter().enumerate() {
        let p = root.join(name);
        std::fs::write(&p, pattern(*len, i as u64 + 1)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        set_mtime(&p, 1_500_000_000 + i as i64);
    }
    setxattr(&root.join("a.txt"), "user.origin", b"planted");
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
    std::fs::create_dir_all(root.join("many")).unwrap();
    for i in 0..extra {
        let p = root.join(format!("many/f{i:04}"));
        std::fs::write(&p, pattern(100 + i * 37, 1000 + i as u64)).unwrap();
        set_mtime(&p, 1_600_000_000 + i as i64);
    }
}

struct Setup {
    places: Places,
    keys: PathBuf,
}

impl Setup {
    fn new(extra: usize) -> (Setup, Snapshot) {
        let places = Places::new("kmsfs-migrate");
        std::fs::create_dir(&places.backing).unwrap();
        plant(&places.backing, extra);
        let before = snapshot(&places.backing, false);
        let keys = places.dir.path().join("keys");
        (Setup { places, keys }, before)
    }

    fn backing(&self) -> &str {
        self.places.backing.to_str().unwrap()
    }

    fn migrate(&self, env: &[(&str, &str)], extra: &[&str]) -> Output {
        let mut args = vec![
            "migrate",
            self.backing(),
            "--kms",
            "local",
            "--key-file",
            self.keys.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run_with(env, &args, false)
    }

    fn rollback(&self, env: &[(&str, &str)]) -> Output {
        run_with(
            env,
            &["migrate", "--rollback", self.backing(), "--json"],
            false,
        )
    }

    /// Mounts, snapshots the mount, unmounts.
    fn through_mount(&self) -> Snapshot {
        let mnt = self.places.mnt.to_str().unwrap();
        run(
            &[
                "mount",
                self.backing(),
                mnt,
                "--log-file",
                self.places.log.to_str().unwrap(),
            ],
            true,
        );
        let seen = std::panic::catch_unwind(|| snapshot(&self.places.mnt, false));
        run(&["umount", mnt], true);
        wait_for_daemon_exit(&self.places.mnt);
        seen.unwrap_or_else(|_| {
            panic!(
                "reading through the mount failed; log:\n{}",
                std::fs::read_to_string(&self.places.log).unwrap_or_default()
            )
        })
    }

    /// Regular files (not kmsfs's) and whether each has a sidecar.
    fn encrypted_state(&self) -> BTreeMap<String, bool> {
        snapshot(&self.places.backing, true)
            .into_iter()
            .filter(|(_, e)| e.kind == "file")
            .map(|(rel, _)| {
                let p = self.places.backing.join(&rel);
                let sc = p.with_file_name(format!(
                    ".kmsfs.{}",
                    p.file_name().unwrap().to_string_lossy()
                ));
                (rel, sc.exists())
            })
            .collect()
    }

    /// Every name below the backing directory that starts with .kmsfs.
    fn kmsfs_names(&self) -> Vec<String> {
        let all = snapshot(&self.places.backing, false);
        all.keys()
            .filter(|k| k.split('/').any(|c| c.starts_with(".kmsfs")))
            .cloned()
            .collect()
    }
}

fn ok(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn killed(out: &Output, what: &str) {
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{what} was to be killed by its failpoint, but ended {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mount shows exactly the original tree (atime aside).
fn assert_same(seen: &Snapshot, want: &Snapshot, when: &str) {
    for (k, w) in want {
        let s = seen
            .get(k)
            .unwrap_or_else(|| panic!("{when}: {k} is missing"));
        assert_eq!(s, w, "{when}: {k} differs");
    }
    let extra: Vec<_> = seen.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(extra.is_empty(), "{when}: unexpected entries {extra:?}");
}

#[test]
fn migrate_a_tree_mount_it_and_roll_it_back() {
    let (s, before) = Setup::new(3);
    let out = s.migrate(&[], &["--json"]);
    let summary = ok(&out, "migrate");
    assert_eq!(summary["changed"], 9, "{summary}");
    assert_eq!(summary["initialised"], true);
    assert_eq!(summary["mandatory"], false);
    // Every file has a sidecar, and its backing data is not the plaintext.
    let state = s.encrypted_state();
    assert!(state.values().all(|&e| e), "{state:?}");
    for (rel, e) in &before {
        if e.kind == "file" && !e.data.is_empty() {
            let raw = std::fs::read(s.places.backing.join(rel)).unwrap();
            assert_ne!(
                &raw, &e.data,
                "{rel} is still plaintext in the backing directory"
            );
            assert!(
                !raw.windows(e.data.len().min(64))
                    .any(|w| w == &e.data[..e.data.len().min(64)]),
                "{rel}'s plaintext appears in its backing file"
            );
        }
    }
    assert!(s
        .kmsfs_names()
        .iter()
        .all(|n| !n.contains("migrate-journal")));
    assert_same(&s.through_mount(), &before, "after migrate");

    // Again: nothing to do. --mandatory makes the root policy mandatory.
    let again = ok(&s.migrate(&[], &["--json", "--mandatory"]), "migrate again");
    assert_eq!(again["changed"], 0);
    assert_eq!(again["already_done"], 9);
    assert_eq!(again["mandatory"], true);
    assert_same(&s.through_mount(), &before, "after --mandatory");
    // A plaintext file added under the now mandatory policy is refused,
    // with what to do.
    let late = s.places.backing.join("sub/late");
    std::fs::write(&late, b"late").unwrap();
    let out = s.migrate(&[], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--not-mandatory"));
    std::fs::remove_file(&late).unwrap();

    let back = ok(&s.rollback(&[]), "rollback");
    assert_eq!(back["changed"], 9, "{back}");
    assert_rolled_back(&s, &before);
}

#[test]
fn migrate_killed_at_each_step_resumes_and_the_mount_serves_both_kinds() {
    let (s, before) = Setup::new(20);
    // Killed after 4 files: a mount shows those decrypted, the rest as they are.
    killed(&s.migrate(&[("KMSFS_MIGRATE_CRASH", "4")], &[]), "migrate");
    let state = s.encrypted_state();
    let done = state.values().filter(|&&e| e).count();
    assert_eq!(done, 4, "{state:?}");
    assert_same(&s.through_mount(), &before, "half migrated");

    // Killed with the temporary copy written, then before its rename.
    killed(
        &s.migrate(&[("KMSFS_MIGRATE_CRASH", "2:copied")], &[]),
        "migrate",
    );
    killed(
        &s.migrate(&[("KMSFS_MIGRATE_CRASH", "3:renaming")], &[]),
        "migrate",
    );
    // The crash window inside the rename: its data step done, not its
    // sidecar step (what the rename leaves if killed between them).
    let journal: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.places.backing.join(".kmsfs-migrate-journal")).unwrap(),
    )
    .unwrap();
    let dir = s.places.backing.join(
        String::from_utf8(hex::decode(journal["dir_hex"].as_str().unwrap()).unwrap())
            .unwrap()
            .trim_start_matches('/'),
    );
    let name =
        String::from_utf8(hex::decode(journal["name_hex"].as_str().unwrap()).unwrap()).unwrap();
    let temp = journal["temp"].as_str().unwrap();
    std::fs::rename(dir.join(temp), dir.join(&name)).unwrap();
    // A mount now would serve that file's ciphertext as plaintext bytes:
    // it is refused until a run finishes the step.
    let refused = run(
        &["mount", s.backing(), s.places.mnt.to_str().unwrap()],
        false,
    );
    assert_eq!(refused.status.code(), Some(1));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("stopped midway") && why.contains("kmsfs migrate"),
        "{why}"
    );

    let resumed = ok(&s.migrate(&[], &["--json"]), "resumed migrate");
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert!(s.encrypted_state().values().all(|&e| e));
    assert_same(&s.through_mount(), &before, "after resume");
    let leftovers: Vec<_> = snapshot(&s.places.backing, false)
        .into_keys()
        .filter(|k| k.contains("~kmsfs-migrate") || k.contains("migrate-journal"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Rollback, killed likewise.
    killed(&s.rollback(&[("KMSFS_MIGRATE_CRASH", "5")]), "rollback");
    assert_eq!(s.encrypted_state().values().filter(|&&e| !e).count(), 5);
    assert_same(&s.through_mount(), &before, "half rolled back");
    killed(
        &s.rollback(&[("KMSFS_MIGRATE_CRASH", "1:copied")]),
        "rollback",
    );
    killed(
        &s.rollback(&[("KMSFS_MIGRATE_CRASH", "2:renaming")]),
        "rollback",
    );
    let back = ok(&s.rollback(&[]), "resumed rollback");
    assert_eq!(back["recovered"], true, "{back}");
    assert_rolled_back(&s, &before);
}

/// The backing directory is the original plaintext tree again, and no
/// kmsfs file is left.
fn assert_rolled_back(s: &Setup, before: &Snapshot) {
    assert_same(
        &snapshot(&s.places.backing, false),
        before,
        "after rollback",
    );
    assert!(s.kmsfs_names().is_empty(), "left: {:?}", s.kmsfs_names());
}

/// A real `kill -9` at whatever point a run over many files has reached.
#[test]
fn migrate_and_rollback_survive_a_real_kill_9() {
    let (s, before) = Setup::new(400);
    for rollback in [false, true] {
        let mut args = vec!["migrate", s.backing()];
        if rollback {
            args.push("--rollback");
        } else {
            args.extend(["--kms", "local", "--key-file", s.keys.to_str().unwrap()]);
        }
        let mut child = common::kmsfs().args(&args).spawn().unwrap();
        // Kill once some files are done but not all (counted by their
        // sidecars, while the run renames and removes names).
        let many = s.places.backing.join("many");
        let sidecars = || {
            std::fs::read_dir(&many)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    n.as_bytes().starts_with(b".kmsfs.") && !n.as_bytes().starts_with(b".kmsfs..~")
                })
                .count()
        };
        let start = Instant::now();
        loop {
            let n = sidecars();
            let done = if rollback { 400 - n } else { n };
            if done >= 50 || start.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "finished before the kill: use more files"
        );
        let out = if rollback {
            s.rollback(&[])
        } else {
            s.migrate(&[], &["--json"])
        };
        ok(&out, "resumed run");
        if !rollback {
            assert!(s.encrypted_state().values().all(|&e| e));
            assert_same(&s.through_mount(), &before, "after kill -9 and resume");
        }
    }
    assert_rolled_back(&s, &before);
}

#[test]
fn hard_links_mounted_dirs_and_reserved_names_are_refused() {
    let (s, before) = Setup::new(0);
    std::fs::hard_link(
        s.places.backing.join("a.txt"),
        s.places.backing.join("a-link"),
    )
    .unwrap();
    let out = s.migrate(&[], &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["hard_linked"], 2, "{summary}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("hard links"));
    // Both names are still the same plaintext file.
    let (a, b) = (
        std::fs::metadata(s.places.backing.join("a.txt")).unwrap(),
        std::fs::metadata(s.places.backing.join("a-link")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(
        std::fs::read(s.places.backing.join("a.txt")).unwrap(),
        before["a.txt"].data
    );

    // Mounted: refused.
    let mnt = s.places.mnt.to_str().unwrap();
    run(
        &[
            "mount",
            s.backing(),
            mnt,
            "--log-file",
            s.places.log.to_str().unwrap(),
        ],
        true,
    );
    let out = s.migrate(&[], &[]);
    run(&["umount", mnt], true);
    wait_for_daemon_exit(&s.places.mnt);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is mounted at"));

    // A plaintext tree holding a name kmsfs reserves is not made a volume.
    let other = common::tempdir("kmsfs-migrate-reserved");
    std::fs::write(other.path().join(".kmsfs.x"), b"mine").unwrap();
    let out = run(
        &[
            "migrate",
            other.path().to_str().unwrap(),
            "--kms",
            "local",
            "--key-file",
            s.keys.to_str().unwrap(),
        ],
        false,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rename it"));
    assert!(!other.path().join(".kmsfs-config.toml").exists());

    // A first run that fails (a keyring that cannot be created) leaves
    // only its locks, which the next run accepts as its own.
    std::fs::remove_file(other.path().join(".kmsfs.x")).unwrap();
    std::fs::write(other.path().join("x"), b"mine").unwrap();
    let dir = other.path().to_str().unwrap();
    let out = run(
        &[
            "migrate",
            dir,
            "--kms",
            "local",
            "--key-file",
            "/proc/no-such-dir/keys",
        ],
        false,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(
        &[
            "migrate",
            dir,
            "--kms",
            "local",
            "--key-file",
            s.keys.to_str().unwrap(),
        ],
        true,
    );
    assert!(other.path().join(".kmsfs.x").exists());
}
