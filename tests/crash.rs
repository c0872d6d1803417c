//! Crash safety: the daemon is killed (SIGKILL, `KMSFS_FAILPOINT`) at every
//! step boundary of every multi-step operation, the volume is mounted
//! again, and every name must read without error and hold a version that
//! was written whole (docs/ARCHITECTURE.md, "Crash safety").

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::{detach, pattern, run, run_with, TestFs};
use kmsfs::failpoint;

const A: usize = 10_000;
const B: usize = 7_000;
const T: usize = 20_000;
const C: usize = 9_000;
const SHRUNK: usize = 5_000;
const GROWN: usize = 30_000;

/// Runs `kmsfs mount BACKING MNT --log-file LOG` with `env` set.
fn mount_with(env: &[(&str, &str)], backing: &str, mnt: &str, log: &str) {
    run_with(env, &["mount", backing, mnt, "--log-file", log], true);
}

fn versions() -> BTreeMap<&'static str, Vec<u8>> {
    let t = pattern(T, 3);
    let mut grown = t[..SHRUNK].to_vec();
    grown.resize(GROWN, 0);
    BTreeMap::from([
        ("A", pattern(A, 1)),
        ("B", pattern(B, 2)),
        ("T", t.clone()),
        ("C", pattern(C, 4)),
        ("empty", Vec::new()),
        ("T-shrunk", t[..SHRUNK].to_vec()),
        ("T-grown", grown),
    ])
}

fn rename_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let (a, b) = (
        CString::new(a.as_os_str().as_bytes()).unwrap(),
        CString::new(b.as_os_str().as_bytes()).unwrap(),
    );
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The operations that reach failpoints of `group`, in a fixed order (a
/// failpoint armed `@N` fires in the Nth of them); their results are
/// ignored, since the daemon dies under them.
fn operate(fs: &TestFs, group: &str) {
    let v = versions();
    let p = |n: &str| fs.path(n);
    match group {
        "create" => {
            let _ = std::fs::write(p("c"), &v["C"]);
        }
        "unlink" => {
            let _ = std::fs::remove_file(p("a"));
        }
        "link" => {
            let _ = std::fs::hard_link(p("a"), p("a2"));
        }
        "rename" => {
            let _ = std::fs::rename(p("t"), p("t2"));
            let _ = std::fs::rename(p("a"), p("b"));
            let _ = rename_exchange(&p("b"), &p("t2"));
        }
        "truncate" => {
            for size in [SHRUNK, GROWN] {
                let f = std::fs::OpenOptions::new().write(true).open(p("t"));
                let _ = f.and_then(|f| f.set_len(size as u64));
            }
        }
        other => panic!("no operation reaches failpoints of {other:?}"),
    }
}

/// Which versions each name may hold after a crash in `group`'s
/// operations (absent is always allowed for names those operations
/// create or remove), and the versions that must survive somewhere.
fn allowed(group: &str) -> (BTreeMap<&'static str, Vec<&'static str>>, Vec<&'static str>) {
    let mut names = BTreeMap::from([("a", vec!["A"]), ("b", vec!["B"]), ("t", vec!["T"])]);
    let mut kept = vec!["B", "T"];
    match group {
        "create" => {
            names.insert("c", vec!["empty", "C"]);
            kept.push("A");
        }
        "unlink" => {}
        "link" => {
            names.insert("a2", vec!["A"]);
            kept.push("A");
        }
        "rename" => {
            names.insert("b", vec!["B", "A", "T"]);
            names.insert("t2", vec!["T", "A"]);
            kept = vec!["A", "T"];
        }
        "truncate" => {
            names.insert("t", vec!["T", "T-shrunk", "T-grown"]);
            kept = vec!["A", "B"];
        }
        _ => unreachable!(),
    }
    (names, kept)
}

/// Reads every name in the mount; each must read whole and hold an allowed
/// version, and the versions that must survive are found.
fn check(fs: &TestFs, failpoint: &str, group: &str) {
    let v = versions();
    let (names, kept) = allowed(group);
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(&fs.mnt).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).unwrap_or_else(|e| {
            panic!(
                "after a crash at {failpoint}: {name} is unreadable: {e}\nlog:\n{}",
                fs.log_text()
            )
        });
        let which = v
            .iter()
            .find(|(_, b)| **b == bytes)
            .map(|(k, _)| *k)
            .unwrap_or_else(|| {
                let t = &v["T"];
                let first_diff = bytes.iter().zip(t.iter()).position(|(a, b)| a != b);
                panic!(
                    "after a crash at {failpoint}: {name} holds {} bytes that no whole version \
                     has (first difference from T at {first_diff:?})\nlog:\n{}",
                    bytes.len(),
                    fs.log_text()
                )
            });
        let ok = names.get(name.as_str()).is_some_and(|l| l.contains(&which));
        assert!(
            ok,
            "after a crash at {failpoint}: {name} holds version {which}"
        );
        found.insert(which);
    }
    for k in kept {
        assert!(
            found.contains(k),
            "after a crash at {failpoint}: version {k} was lost"
        );
    }
}

/// How many times each group's operations reach one failpoint.
fn reaches(group: &str) -> u32 {
    match group {
        "rename" => 3,
        "truncate" => 2,
        _ => 1,
    }
}

#[test]
fn a_crash_at_any_step_leaves_every_file_whole() {
    let v = versions();
    let mut walked = 0;
    let only = std::env::var("KMSFS_CRASH_ONLY").ok();
    for failpoint in kmsfs::failpoint::ALL {
        if only.as_deref().is_some_and(|o| !failpoint.starts_with(o)) {
            continue;
        }
        let group = failpoint.split(':').next().unwrap();
        for nth in 1..=reaches(group) {
            let mut fs = TestFs::new(&[]);
            std::fs::write(fs.path("a"), &v["A"]).unwrap();
            std::fs::write(fs.path("b"), &v["B"]).unwrap();
            std::fs::write(fs.path("t"), &v["T"]).unwrap();
            fs.umount();
            let armed = format!("{failpoint}@{nth}");
            mount_with(
                &[("KMSFS_FAILPOINT", armed.as_str())],
                fs.backing.to_str().unwrap(),
                fs.mnt.to_str().unwrap(),
                fs.log.to_str().unwrap(),
            );
            operate(&fs, group);
            let died = (0..100).any(|_| {
                let gone = fs.daemon_pid().is_none();
                if !gone {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                gone
            });
            detach(&fs.mnt);
            assert!(died, "the daemon did not stop at failpoint {armed}");
            fs.mount(&[]);
            check(&fs, &armed, group);
            // The mount settled what the crash left: a second look agrees,
            // and a remount too.
            fs.remount();
            check(&fs, &armed, group);
            walked += 1;
        }
    }
    if only.is_none() {
        assert!(walked >= kmsfs::failpoint::ALL.len());
    }
}

#[test]
fn an_unknown_failpoint_changes_nothing() {
    let mut fs = TestFs::new(&[]);
    fs.umount();
    mount_with(
        &[("KMSFS_FAILPOINT", "no-such-step")],
        fs.backing.to_str().unwrap(),
        fs.mnt.to_str().unwrap(),
        fs.log.to_str().unwrap(),
    );
    fs.set_mounted(true);
    std::fs::write(fs.path("x"), b"whole").unwrap();
    std::fs::rename(fs.path("x"), fs.path("y")).unwrap();
    assert_eq!(std::fs::read(fs.path("y")).unwrap(), b"whole");
    let _ = run(&["--version"], true);
}

/// One durable step of the power-loss workload: each ends with the fsyncs
/// an application makes to keep its result (file, then directory).
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Create `name` (new) holding `pattern(len, seed)`.
    Write(&'static str, usize, u64),
    Rename(&'static str, &'static str),
    Exchange(&'static str, &'static str),
    Truncate(&'static str, usize),
    Link(&'static str, &'static str),
    Unlink(&'static str),
}

const POWER_LOSS_STEPS: &[Step] = &[
    Step::Write("db", 9_000, 101),
    Step::Write("db.tmp", 6_500, 102),
    Step::Rename("db.tmp", "db"),
    Step::Write("db.tmp", 12_345, 103),
    Step::Rename("db.tmp", "db"),
    Step::Write("log", 20_000, 104),
    Step::Truncate("log", 5_000),
    Step::Truncate("log", 30_000),
    Step::Truncate("log", 8_192),
    Step::Link("db", "db.bak"),
    Step::Write("db.tmp", 3_000, 105),
    Step::Rename("db.tmp", "db"),
    Step::Unlink("db.bak"),
    Step::Write("a", 7_000, 106),
    Step::Write("b", 4_000, 107),
    Step::Rename("a", "b"),
    Step::Write("c", 100, 108),
    Step::Exchange("c", "b"),
    Step::Unlink("c"),
    Step::Truncate("b", 0),
];

/// The names' contents after `step`, applied to `model`.
fn apply(model: &mut BTreeMap<&'static str, Vec<u8>>, step: Step) {
    match step {
        Step::Write(name, len, seed) => {
            model.insert(name, pattern(len, seed));
        }
        Step::Rename(from, to) => {
            let v = model.remove(from).unwrap();
            model.insert(to, v);
        }
        Step::Exchange(x, y) => {
            let (vx, vy) = (model.remove(x).unwrap(), model.remove(y).unwrap());
            model.insert(x, vy);
            model.insert(y, vx);
        }
        Step::Truncate(name, len) => model.get_mut(name).unwrap().resize(len, 0),
        Step::Link(from, to) => {
            let v = model[from].clone();
            model.insert(to, v);
        }
        Step::Unlink(name) => {
            model.remove(name).unwrap();
        }
    }
}

fn fsync_dir(dir: &Path) {
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// Runs `step` in mount directory `mnt`, then makes it durable as
/// applications do.
fn perform(mnt: &Path, step: Step) {
    let p = |n: &str| mnt.join(n);
    match step {
        Step::Write(name, len, seed) => {
            let mut f = std::fs::File::create_new(p(name)).unwrap();
            std::io::Write::write_all(&mut f, &pattern(len, seed)).unwrap();
            f.sync_all().unwrap();
        }
        Step::Rename(from, to) => std::fs::rename(p(from), p(to)).unwrap(),
        Step::Exchange(x, y) => rename_exchange(&p(x), &p(y)).unwrap(),
        Step::Truncate(name, len) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p(name))
                .unwrap();
            f.set_len(len as u64).unwrap();
            f.sync_all().unwrap();
        }
        Step::Link(from, to) => std::fs::hard_link(p(from), p(to)).unwrap(),
        Step::Unlink(name) => std::fs::remove_file(p(name)).unwrap(),
    }
    fsync_dir(mnt);
}

/// On a failed assertion, takes down whatever is mounted on the path (a
/// daemon may be paused in its handshake, and would never exit), so that
/// the loop disks under it can be unmounted.
struct KillOnPanic(std::path::PathBuf);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for pid in common::daemon_pids(&self.0) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            detach(&self.0);
        }
    }
}

/// Unmounts a loop-mounted disk copy if it is still mounted when dropped
/// (after a failed assertion).
struct LazyUnmount(std::path::PathBuf);

impl Drop for LazyUnmount {
    fn drop(&mut self) {
        let path = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The power-loss model. The backing directory sits on ext4 on a loop
/// device, mounted with a journal commit interval longer than the test, so
/// the disk changes in ways a power loss can show only when something is
/// fsynced; the daemon stops after each fsync it makes
/// (`KMSFS_STOP_AFTER_SYNC`) and the disk image is copied there. Each copy
/// is then mounted (ext4 replays its journal as after a power loss) and
/// every name must read whole, holding its state after the last step that
/// had returned at the copy, or a later one.
#[test]
fn a_power_loss_after_any_fsync_keeps_every_synced_file_whole() {
    use common::loop_disk::LoopDisk;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let disk = LoopDisk::with_options("ext4", 64, "loop,commit=600");
    let places = common::Places::new("kmsfs-power-loss");
    let _cleanup = KillOnPanic(places.mnt.clone());
    let key_file = places.dir.path().join("keys");
    let backing = disk.top().join("backing");
    common::init_local(&backing, &key_file, &[]);
    let fifos = places.dir.path().join("fifos");
    std::fs::create_dir(&fifos).unwrap();
    for name in [failpoint::SYNCED_FIFO, failpoint::RESUME_FIFO] {
        let path = CString::new(fifos.join(name).as_os_str().as_bytes()).unwrap();
        assert_eq!(
            unsafe { libc::mkfifo(path.as_ptr(), 0o600) },
            0,
            "mkfifo {name}"
        );
    }
    // Held open for the whole test, so the daemon's open never waits.
    let mut synced = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifos.join(failpoint::SYNCED_FIFO))
        .unwrap();
    mount_with(
        &[(failpoint::STOP_AFTER_SYNC_ENV, fifos.to_str().unwrap())],
        backing.to_str().unwrap(),
        places.mnt.to_str().unwrap(),
        places.log.to_str().unwrap(),
    );
    // Every state the names pass through: states[k] is after step k.
    let mut states = vec![BTreeMap::new()];
    for step in POWER_LOSS_STEPS {
        let mut next = states.last().unwrap().clone();
        apply(&mut next, *step);
        states.push(next);
    }
    let done = Arc::new(AtomicUsize::new(0));
    let workload = {
        let (mnt, done) = (places.mnt.clone(), done.clone());
        std::thread::spawn(move || {
            for step in POWER_LOSS_STEPS {
                perform(&mnt, *step);
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let copies = common::tempdir("kmsfs-power-loss-copies");
    // (image copy, steps that had returned when it was taken)
    let mut snapshots = Vec::new();
    let mut unmount = None;
    loop {
        let mut byte = [0];
        match std::io::Read::read(&mut synced, &mut byte) {
            Ok(1) => {
                let steps_done = done.load(Ordering::SeqCst);
                let copy = copies.path().join(format!("image-{}", snapshots.len()));
                let cp = std::process::Command::new("cp")
                    .arg("--sparse=always")
                    .arg(&disk.image)
                    .arg(&copy)
                    .status()
                    .unwrap();
                assert!(cp.success(), "copy the disk image");
                snapshots.push((copy, steps_done));
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(fifos.join(failpoint::RESUME_FIFO))
                    .and_then(|mut f| std::io::Write::write_all(&mut f, b"r"))
                    .expect("resume the daemon");
                continue;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read the synced FIFO: {e}"),
        }
        match &unmount {
            // Unmounting syncs too: keep answering while it runs.
            None if workload.is_finished() => {
                let mnt = places.mnt.clone();
                unmount = Some(std::thread::spawn(move || detach(&mnt)));
            }
            Some(thread) if thread.is_finished() => break,
            _ => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    unmount.unwrap().join().expect("the mount detached");
    workload.join().expect("the workload ran every step");
    assert!(
        snapshots.len() >= POWER_LOSS_STEPS.len(),
        "only {} fsync points were seen for {} durable steps",
        snapshots.len(),
        POWER_LOSS_STEPS.len()
    );
    println!("{} disk copies, one per fsync", snapshots.len());
    for (i, (image, steps_done)) in snapshots.iter().enumerate() {
        let top = copies.path().join(format!("fs-{i}"));
        std::fs::create_dir(&top).unwrap();
        let mount = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(&top)
            .output()
            .unwrap();
        assert!(mount.status.success(), "mount copy {i}: {mount:?}");
        let _copy_mounted = LazyUnmount(top.clone());
        let log = copies.path().join(format!("kmsfs-{i}.log"));
        let backing = top.join("backing");
        mount_with(
            &[],
            backing.to_str().unwrap(),
            places.mnt.to_str().unwrap(),
            log.to_str().unwrap(),
        );
        let mut allowed = states[*steps_done..].to_vec();
        // The step under way when the disk was copied: a file it was
        // creating may hold nothing yet, as on ext4 (created, not synced).
        if let Some(Step::Write(name, ..)) = POWER_LOSS_STEPS.get(*steps_done) {
            let mut created = states[*steps_done].clone();
            created.insert(name, Vec::new());
            allowed.push(created);
        }
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(&places.mnt).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(places.mnt.join(&name)).unwrap_or_else(|e| {
                panic!(
                    "power loss at fsync {i} (after step {steps_done}): {name} is unreadable: \
                     {e}\nlog:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            assert!(
                allowed.iter().any(|s| s.get(name.as_str()) == Some(&bytes)),
                "power loss at fsync {i} (after step {steps_done}): {name} holds {} bytes, no \
                 state it had from then on",
                bytes.len()
            );
            names.insert(name);
        }
        // And nothing synced is missing: the set of names is one the
        // steps made from then on.
        assert!(
            allowed.iter().any(|s| s.keys().all(|k| names.contains(*k))
                && names.iter().all(|n| s.contains_key(n.as_str()))),
            "power loss at fsync {i} (after step {steps_done}): names {names:?} are no state \
             from then on"
        );
        run(&["umount", places.mnt.to_str().unwrap()], true);
        common::wait_for_daemon_exit(&places.mnt);
        let umount = std::process::Command::new("umount")
            .arg(&top)
            .status()
            .unwrap();
        assert!(umount.success());
        std::fs::remove_file(image).unwrap();
    }
}
