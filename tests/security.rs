//! The storage attacker of THREAT_MODEL.md (who can write the backing
//! directory), tried as they would: hard links, symlinks, FIFOs and device
//! nodes planted in the backing directory, names that would forge log
//! lines; and the keyring and daemon log, which must not be redirected or
//! lose updates.

mod common;

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{find_by, kmsfs, pattern, run, TestFs};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mkfifo(p: &Path) {
    assert_eq!(
        unsafe { libc::mkfifo(cpath(p).as_ptr(), 0o644) },
        0,
        "mkfifo"
    );
}

fn mknod_char(p: &Path, major: u32, minor: u32) {
    let dev = libc::makedev(major, minor);
    let r = unsafe { libc::mknod(cpath(p).as_ptr(), libc::S_IFCHR | 0o666, dev) };
    assert_eq!(r, 0, "mknod {}", std::io::Error::last_os_error());
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Remounts with a kernel name and attribute cache of a minute, so that an
/// object swapped in the backing directory after the kernel looked a name
/// up is met by the daemon (OPEN, SETATTR on the inode it knows), not by a
/// fresh lookup. Nothing is open afterwards.
fn remount_long_cached(fs: &mut TestFs) {
    fs.umount();
    fs.mount(&["--attr-timeout", "60"]);
}

/// Runs `kmsfs ARGS`, failing the test if it takes longer than 20 s (a
/// FIFO opened for reading would block forever).
fn run_quickly(args: &[&str]) -> Output {
    let mut child = kmsfs()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("kmsfs {args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Attack 2: with a mandatory `/` and a non-mandatory `/public`, a hard link
/// of an encrypted file into `/public` (no sidecar) must neither unmask the
/// file as plaintext nor let the next write land unencrypted.
#[test]
fn hard_link_into_a_non_mandatory_subtree_passes_nothing_through() {
    let mut fs = TestFs::new(&[]);
    let secret = b"the secret database: account 1234, balance 99\n".repeat(200);
    fs::create_dir(fs.path("secret")).unwrap();
    fs::create_dir(fs.path("public")).unwrap();
    fs::write(fs.path("secret/db"), &secret).unwrap();
    fs.umount();
    fs.set_policy("/public", "default", &["--not-mandatory"]);
    fs.mount(&[]);

    // The attacker's link, then a user lists the directory.
    fs::hard_link(fs.backing_path("secret/db"), fs.backing_path("public/x")).unwrap();
    Command::new("ls")
        .arg("-l")
        .arg(fs.path("public"))
        .output()
        .unwrap();

    let got = fs::read(fs.path("secret/db")).unwrap();
    assert!(got == secret, "the real name does not decrypt any more");
    let ciphertext = fs::read(fs.backing_path("secret/db")).unwrap();
    if let Ok(got) = fs::read(fs.path("public/x")) {
        assert!(
            !contains(&got, b"secret database"),
            "plaintext via the link"
        );
        assert_ne!(got, ciphertext, "ciphertext passed through as content");
    }

    // The user's next write through the real name lands encrypted.
    let update = b"NEW SECRET: the vault code is 0000\n".repeat(100);
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(fs.path("secret/db"))
        .unwrap();
    f.write_all(&update).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let raw = fs::read(fs.backing_path("secret/db")).unwrap();
    assert!(!contains(&raw, b"NEW SECRET"), "written in the clear");
    assert!(fs::read(fs.path("secret/db")).unwrap() == update);
}

/// A plaintext file is one with a single link: two names of a sidecar-less
/// file in a non-mandatory subtree are refused, one is passed through.
#[test]
fn a_plaintext_file_with_two_links_is_not_passed_through() {
    let fs = TestFs::with_plaintext_dir("public", |fs| {
        fs::write(fs.backing_path("public/a"), b"legacy data").unwrap();
        fs::hard_link(fs.backing_path("public/a"), fs.backing_path("public/b")).unwrap();
    });
    for name in ["public/a", "public/b"] {
        assert_eq!(errno(fs::read(fs.path(name))), Some(libc::EIO), "{name}");
    }
    fs::remove_file(fs.backing_path("public/b")).unwrap();
    assert_eq!(fs::read(fs.path("public/a")).unwrap(), b"legacy data");
}

/// Attack 3: a symlink planted in place of a file the kernel knows must not
/// make the daemon (root) chmod the symlink's target.
#[test]
fn root_chmod_does_not_follow_a_planted_symlink() {
    let mut fs = TestFs::new(&[]);
    let victim = fs.dir.path().join("victim");
    fs::write(&victim, b"not yours").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(fs.path("f"), b"data").unwrap();
    remount_long_cached(&mut fs);
    fs::metadata(fs.path("f")).unwrap();

    // The attack: f becomes a symlink to a file outside the backing tree.
    fs::remove_file(fs.backing_path("f")).unwrap();
    symlink(&victim, fs.backing_path("f")).unwrap();
    Command::new("chmod")
        .arg("777")
        .arg(fs.path("f"))
        .output()
        .unwrap();

    let mode = fs::metadata(&victim).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o600, "the daemon chmodded the symlink's target");
}

/// A FIFO under a sidecar's name: the open fails at once, and the mount
/// keeps serving other files.
#[test]
fn a_fifo_planted_as_a_sidecar_fails_promptly() {
    let mut fs = TestFs::new(&[]);
    fs::write(fs.path("f"), b"data").unwrap();
    fs::write(fs.path("g"), b"other data").unwrap();
    fs.umount();
    fs::remove_file(fs.backing_path(".kmsfs.f")).unwrap();
    mkfifo(&fs.backing_path(".kmsfs.f"));
    fs.mount(&[]);

    let path = fs.path("f");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(errno(fs::read(path)));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("opening a file whose sidecar is a FIFO hangs");
    assert_eq!(r, Some(libc::EIO));
    fs.assert_logged("f: sidecar header: sidecar is not a regular file");
    assert_eq!(fs::read(fs.path("g")).unwrap(), b"other data");
    fs::write(fs.path("h"), b"new").unwrap();
    assert_eq!(fs::read(fs.path("h")).unwrap(), b"new");
}

/// A device node (or another file) put where a data file was, after the
/// kernel looked the file up: the daemon opens neither, answers EIO, and
/// the log names the file.
#[test]
fn a_device_node_planted_as_a_data_file_is_not_opened() {
    let mut fs = TestFs::new(&[]);
    fs::write(fs.path("f"), b"data of f").unwrap();
    fs::write(fs.path("g"), b"data of g").unwrap();
    fs::write(fs.path("h"), b"data of h").unwrap();
    remount_long_cached(&mut fs);
    fs::metadata(fs.path("f")).unwrap();
    fs::metadata(fs.path("g")).unwrap();

    // The attack: f becomes /dev/null's device node, g another file's data.
    fs::remove_file(fs.backing_path("f")).unwrap();
    mknod_char(&fs.backing_path("f"), 1, 3);
    fs::rename(fs.backing_path("h"), fs.backing_path("g")).unwrap();

    assert_eq!(errno(fs::read(fs.path("f"))), Some(libc::EIO));
    let w = OpenOptions::new().write(true).open(fs.path("f"));
    assert_eq!(errno(w), Some(libc::EIO));
    assert_eq!(errno(fs::read(fs.path("g"))), Some(libc::EIO));
    fs.assert_logged("open: f: backing data is not a regular file");
    // Another regular file under g's name is looked up afresh (ESTALE, as
    // after a `kmsfs rekey`), and h's data does not authenticate under g's
    // header.
    fs.assert_logged("read: g: block 0: block 0 failed authentication");
    // The mount goes on.
    fs::write(fs.path("k"), b"fine").unwrap();
    assert_eq!(fs::read(fs.path("k")).unwrap(), b"fine");
}

/// A name holding a newline and a fake log prefix, for a file whose open
/// fails: the log line shows the name escaped, and forges no line.
#[test]
fn a_name_cannot_forge_log_lines() {
    let fs = TestFs::new(&[]);
    let forged = "2099-01-01T00:00:00.000000Z ERROR kmsfs: forged by the attacker";
    let name = format!("evil\n{forged}");
    // No sidecar, under the mandatory root: the open fails and is logged.
    fs::write(fs.backing_path(&name), b"planted").unwrap();
    assert_eq!(errno(fs::read(fs.path(&name))), Some(libc::EIO));
    let log = fs.log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("2099-01-01")),
        "forged log line:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("evil"))
        .unwrap_or_else(|| panic!("the failed open is not logged:\n{log}"));
    assert!(line.contains(&format!("evil\\n{forged}")), "{line}");
}

/// The background daemon's default log is not a predictable name in /tmp,
/// and is private; an explicit --log-file is created private too.
#[test]
fn the_daemon_log_is_private_and_not_in_tmp() {
    let mut fs = TestFs::new(&[]);
    fs.umount();
    let out = run(
        &[
            "mount",
            fs.backing.to_str().unwrap(),
            fs.mnt.to_str().unwrap(),
        ],
        true,
    );
    fs.set_mounted(true);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let log = said
        .split_once("(log: ")
        .and_then(|(_, rest)| rest.trim_end().strip_suffix(')'))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("mount does not say where it logs: {said}"));
    fs.umount();
    assert!(
        !log.starts_with("/tmp") && !log.starts_with(std::env::temp_dir()),
        "{}",
        log.display()
    );
    let meta = fs::symlink_metadata(&log).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o777, 0o600, "{}", log.display());
    let dir = fs::symlink_metadata(log.parent().unwrap()).unwrap();
    assert!(dir.is_dir());
    assert_eq!(dir.mode() & 0o777, 0o700);
    fs::remove_file(&log).unwrap();
    assert_eq!(fs::metadata(&fs.log).unwrap().mode() & 0o777, 0o600);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount(8)")
            .success();
        assert!(ok, "cannot mount a tmpfs (the tests run as root)");
        SmallDisk { dir }
    }

    /// Fills it: every further write fails with ENOSPC.
    fn fill(&self) {
        let mut f = fs::File::create(self.dir.path().join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// With the disk under its log full, the daemon drops log lines and keeps
/// serving: a log write that fails must not take the mount down (it used
/// to: the logger reported the failure on stderr, which is that same log,
/// and a failed `eprintln!` panics).
#[test]
fn a_full_log_disk_does_not_stop_the_mount() {
    let mut fs = TestFs::new(&[]);
    fs.umount();
    let logs = SmallDisk::new("64k");
    logs.fill();
    let log = logs.dir.path().join("log");
    run(
        &[
            "mount",
            fs.backing.to_str().unwrap(),
            fs.mnt.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
        ],
        true,
    );
    fs.set_mounted(true);
    // Lines the daemon must log and cannot: a damaged header, refused.
    fs::write(fs.backing.join("damaged"), b"some bytes").unwrap();
    fs::write(fs.backing.join(".kmsfs.damaged"), b"bad").unwrap();
    for _ in 0..50 {
        let err = fs::read(fs.path("damaged")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }
    let data = pattern(100_000, 9);
    fs::write(fs.path("after"), &data).unwrap();
    assert_eq!(fs::read(fs.path("after")).unwrap(), data);
    fs.umount();
}

/// A new keyring with key "default" in a fresh directory.
fn keyring() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let keys = d.path().join("keys");
    run(
        &["keys", "create", "--key-file", keys.to_str().unwrap()],
        true,
    );
    (d, keys)
}

/// The versions of key "default", from `kmsfs keys list`.
fn versions(keys: &Path) -> Vec<u64> {
    let out = run(
        &["keys", "list", "--key-file", keys.to_str().unwrap()],
        true,
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    find_by(&list, "name", "default")["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn a_symlinked_keyring_is_refused() {
    let (d, keys) = keyring();
    let link = d.path().join("link");
    symlink(&keys, &link).unwrap();
    let before = fs::read(&keys).unwrap();
    for cmd in ["list", "rotate"] {
        let out = run(&["keys", cmd, "--key-file", link.to_str().unwrap()], false);
        assert!(!out.status.success(), "keys {cmd} used a symlinked keyring");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("symlink"), "{err}");
    }
    assert_eq!(fs::read(&keys).unwrap(), before);
}

/// Symlinks at every temp name a rotation could predict (the old
/// `.NAME.tmpPID` for the next few thousand process IDs, and the usual
/// suffixes) are neither written through nor in the way.
#[test]
fn a_symlink_at_a_predictable_temp_name_is_not_written_through() {
    let (d, keys) = keyring();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, b"victim").unwrap();
    let last_pid: u32 = fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut names: Vec<String> = (last_pid + 1..last_pid + 3000)
        .map(|pid| format!(".keys.tmp{pid}"))
        .collect();
    names.extend(["keys.tmp", ".keys.tmp", "keys.new", ".keys.new", "keys~"].map(String::from));
    for n in &names {
        symlink(&victim, d.path().join(n)).unwrap();
    }
    run(
        &["keys", "rotate", "--key-file", keys.to_str().unwrap()],
        true,
    );
    assert_eq!(fs::read(&victim).unwrap(), b"victim");
    assert!(fs::symlink_metadata(&keys).unwrap().is_file());
    assert_eq!(versions(&keys), [1, 2]);

    // A symlink at the lock's name is refused, not followed.
    let lock = d.path().join("keys.lock");
    let _ = fs::remove_file(&lock);
    symlink(outside.path().join("made"), &lock).unwrap();
    let out = run(
        &["keys", "rotate", "--key-file", keys.to_str().unwrap()],
        false,
    );
    assert!(!out.status.success());
    assert!(!outside.path().join("made").exists());
    assert_eq!(versions(&keys), [1, 2]);
}

/// Twenty `kmsfs keys rotate` at once on one keyring: every version they
/// report is in the keyring afterwards.
#[test]
fn concurrent_rotations_lose_no_version() {
    for _round in 0..3 {
        let (_d, keys) = keyring();
        let children: Vec<_> = (0..20)
            .map(|_| {
                kmsfs()
                    .args(["keys", "rotate", "--key-file", keys.to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(versions(&keys), (1..=21).collect::<Vec<u64>>());
    }
}

/// `kmsfs info` on a backing name that is a symlink or a FIFO (each with a
/// valid sidecar beside it) reports that, without following or opening it.
#[test]
fn info_neither_follows_nor_opens_what_is_not_a_regular_file() {
    let mut fs = TestFs::new(&[]);
    fs::write(fs.path("f"), pattern(10_000, 1)).unwrap();
    fs.umount();
    for n in ["link", "fifo"] {
        fs::copy(
            fs.backing_path(".kmsfs.f"),
            fs.backing_path(&format!(".kmsfs.{n}")),
        )
        .unwrap();
    }
    symlink("f", fs.backing_path("link")).unwrap();
    mkfifo(&fs.backing_path("fifo"));
    for n in ["link", "fifo"] {
        let out = run_quickly(&["info", fs.backing_path(n).to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "info {n}");
        assert!(err.contains("not a regular file"), "{err}");
    }
    let out = run_quickly(&["info", fs.backing_path("f").to_str().unwrap()]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plaintext_size"], 10_000);
}
