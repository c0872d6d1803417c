//! kmsfs mounted the way Linux mounts file systems: `mount -t fuse.kmsfs`
//! through the helper `kmsfs install-helper` puts in /sbin, an fstab line,
//! options from the environment and the trusted configuration, and the
//! sd_notify messages a systemd `Type=notify` service waits for.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::Places;

const EXIT_USAGE: i32 = 2;
const HELPER: &str = "/sbin/mount.fuse.kmsfs";

/// Installs the helper (once per test process) with the binary under test
/// and checks that mount(8) will run this very binary.
fn install_helper() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        common::run(&["install-helper", "--dir", "/sbin"], true);
    });
    assert_eq!(
        std::fs::canonicalize(HELPER).unwrap(),
        std::fs::canonicalize(env!("CARGO_BIN_EXE_kmsfs")).unwrap(),
        "{HELPER} is not the kmsfs under test (did another run install its own?)"
    );
}

/// A volume with the local KMS, initialised with `trusted` as its trusted
/// configuration.
fn volume(prefix: &str, trusted: &Path) -> Places {
    let p = Places::new(prefix);
    let key_file = p.dir.path().join("keys");
    common::run_with(
        &[("KMSFS_CONFIG", trusted.to_str().unwrap())],
        &[
            "init",
            p.backing.to_str().unwrap(),
            "--kms",
            "local",
            "--key-file",
            key_file.to_str().unwrap(),
        ],
        true,
    );
    p
}

/// mount(8) (or umount(8)) with `args`, and `KMSFS_CONFIG` set to `trusted`
/// unless None.
fn mount8(program: &str, trusted: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(program);
    c.args(args).env_remove("KMSFS_CONFIG");
    if let Some(t) = trusted {
        c.env("KMSFS_CONFIG", t);
    }
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mount's flags and the file system's options, as mountinfo lists
/// them (None if nothing is mounted at `mnt`).
fn mount_options(mnt: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        (fields[4] == mnt.to_str().unwrap()).then(|| {
            let superopts = right.split(' ').nth(2).unwrap_or("").to_owned();
            (fields[5].to_owned(), superopts)
        })
    })
}

fn has(list: &str, option: &str) -> bool {
    list.split(',').any(|o| o == option)
}

/// Writes a file through the mount, reads it back, and checks that the
/// backing directory holds no plaintext of it.
fn write_read(p: &Places, name: &str) {
    let text = format!("through the mount: {name}");
    std::fs::write(p.mnt.join(name), &text).unwrap();
    assert_eq!(std::fs::read_to_string(p.mnt.join(name)).unwrap(), text);
    let stored = std::fs::read(p.backing.join(name)).unwrap();
    assert!(
        !stored.windows(text.len()).any(|w| w == text.as_bytes()),
        "plaintext in the backing directory"
    );
}

/// Unmounts with umount(8), as a user would, and waits for the daemon.
fn umount8(mnt: &Path) {
    assert_ok(&mount8("umount", None, &[mnt.to_str().unwrap()]), "umount");
    common::wait_for_daemon_exit(mnt);
    assert!(
        common::daemon_pids(mnt).is_empty(),
        "the daemon outlived the unmount"
    );
}

/// Detaches the mount if a test fails before its own unmount.
struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        if mount_options(self.0).is_some() {
            common::detach(self.0);
        }
    }
}

#[test]
fn mount_t_fuse_kmsfs_mounts_with_kernel_flags_and_kmsfs_settings() {
    install_helper();
    let trusted = common::trusted_config();
    let p = volume("kmsfs-helper", &trusted);
    let (b, m) = (p.backing.to_str().unwrap(), p.mnt.to_str().unwrap());
    let opts = format!(
        "noatime,noexec,nosuid,nodev,_netdev,cache_size=500,threads=2,log_file={}",
        p.log.display()
    );
    let _guard = Unmount(&p.mnt);
    let out = mount8(
        "mount",
        Some(&trusted),
        &["-t", "fuse.kmsfs", b, m, "-o", &opts],
    );
    assert_ok(&out, "mount -t fuse.kmsfs");
    let (flags, superopts) = mount_options(&p.mnt).expect("mounted");
    for f in ["noexec", "nosuid", "nodev", "noatime", "rw"] {
        assert!(has(&flags, f), "{f} missing from {flags}");
    }
    assert!(!has(&superopts, "allow_other"), "{superopts}");
    write_read(&p, "hello.txt");
    assert!(
        std::fs::read_to_string(&p.log).unwrap().contains("mounted"),
        "log_file= was not used"
    );
    umount8(&p.mnt);
    assert!(mount_options(&p.mnt).is_none());
}

#[test]
fn an_fstab_line_mounts_and_mount_a_finds_it_mounted() {
    install_helper();
    let trusted = common::trusted_config();
    let p = volume("kmsfs-fstab", &trusted);
    let fstab = p.dir.path().join("fstab");
    // The trusted configuration comes from config=, as fstab has no other
    // place for it: mount(8) runs without KMSFS_CONFIG here.
    std::fs::write(
        &fstab,
        format!(
            "# kmsfs test\n{} {} fuse.kmsfs \
             _netdev,nofail,x-systemd.automount,x-systemd.mount-timeout=30,auto,comment=test,\
             noatime,allow_other,config={},log_file={} 0 0\n",
            p.backing.display(),
            p.mnt.display(),
            trusted.display(),
            p.log.display()
        ),
    )
    .unwrap();
    let (f, m) = (fstab.to_str().unwrap(), p.mnt.to_str().unwrap());
    let _guard = Unmount(&p.mnt);
    assert_ok(&mount8("mount", None, &["-T", f, m]), "mount -T FSTAB MNT");
    let (_, superopts) = mount_options(&p.mnt).expect("mounted");
    assert!(has(&superopts, "allow_other"), "{superopts}");
    write_read(&p, "from-fstab.txt");
    // mount -a runs the helper again for a line it cannot match to the
    // kernel's mount; the helper finds it mounted, which is no error.
    assert_ok(&mount8("mount", None, &["--fstab", f, "-a"]), "mount -a");
    assert_eq!(common::daemon_pids(&p.mnt).len(), 1, "one daemon");
    umount8(&p.mnt);
}

#[test]
fn refused_and_unknown_options_exit_2_naming_the_option() {
    install_helper();
    let trusted = common::trusted_config();
    let p = volume("kmsfs-refuse", &trusted);
    let (b, m) = (p.backing.to_str().unwrap(), p.mnt.to_str().unwrap());
    let _guard = Unmount(&p.mnt);
    let expect = |out: Output, needle: &str| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "{err}");
        assert!(err.contains(needle), "{needle:?} not in: {err}");
        assert!(!err.contains("os error 22"), "a raw EINVAL: {err}");
        assert!(mount_options(&p.mnt).is_none(), "mounted anyway");
    };
    let via_mount8 = |opts: &str| {
        mount8(
            "mount",
            Some(&trusted),
            &["-t", "fuse.kmsfs", b, m, "-o", opts],
        )
    };
    expect(
        via_mount8("noatime,frobnicate"),
        "unknown mount option \"frobnicate\"",
    );
    // mount(8) passes suid on only after user (which implies nosuid).
    expect(via_mount8("user,suid"), "\"suid\" is refused");
    expect(via_mount8("strictatime"), "noatime");
    expect(via_mount8("threads=none"), "threads must be a whole number");
    expect(
        common::run(&["mount", b, m, "-o", "dev"], false),
        "\"dev\" is refused",
    );
    // Options from the environment are checked as well (a failure, 1).
    let out = common::run_with(&[("KMSFS_OPTIONS", "rw,bogus")], &["mount", b, m], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("KMSFS_OPTIONS") && err.contains("bogus"),
        "{err}"
    );
}

#[test]
fn command_line_beats_environment_beats_trusted_configuration() {
    // A trusted configuration of its own, whose [mount] table no other
    // test sees.
    let trusted_dir = common::tempdir("kmsfs-layers-trust");
    let trusted = trusted_dir.path().join("kmsfs.toml");
    let p = volume("kmsfs-layers", &trusted);
    let mut text = std::fs::read_to_string(&trusted).unwrap();
    text.push_str("\n[mount]\noptions = [\"ro\", \"allow_other\"]\nthreads = 2\n");
    std::fs::write(&trusted, text).unwrap();
    let (b, m) = (p.backing.to_str().unwrap(), p.mnt.to_str().unwrap());
    let _guard = Unmount(&p.mnt);
    let config = trusted.to_str().unwrap();
    // Config: ro; environment: noexec and the log file; command line: rw.
    let log = p.log.to_str().unwrap();
    let env = [
        ("KMSFS_CONFIG", config),
        ("KMSFS_OPTIONS", "noexec"),
        ("KMSFS_LOG_FILE", log),
    ];
    common::run_with(&env, &["mount", b, m, "-o", "rw"], true);
    let (flags, superopts) = mount_options(&p.mnt).expect("mounted");
    assert!(has(&flags, "rw") && has(&flags, "noexec"), "{flags}");
    assert!(has(&superopts, "allow_other"), "{superopts}");
    assert!(
        std::fs::metadata(&p.log).is_ok(),
        "KMSFS_LOG_FILE was not used"
    );
    write_read(&p, "layers.txt");
    common::run_with(&env, &["umount", m], true);
    common::wait_for_daemon_exit(&p.mnt);
    // Without the command line's rw, the configuration's ro holds.
    common::run_with(&env, &["mount", b, m], true);
    let (flags, _) = mount_options(&p.mnt).expect("mounted");
    assert!(has(&flags, "ro"), "{flags}");
    assert!(
        std::fs::write(p.mnt.join("x"), "x").is_err(),
        "a read-only mount took a write"
    );
    common::run_with(&env, &["umount", m], true);
    common::wait_for_daemon_exit(&p.mnt);
}

/// Receives one sd_notify datagram, or panics after `secs`.
fn receive(socket: &UnixDatagram, secs: u64) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(secs)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("no sd_notify message from the foreground mount");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A foreground mount under `NOTIFY_SOCKET=notify_socket`.
fn foreground_mount(p: &Places, notify_socket: &str) -> std::process::Child {
    common::kmsfs()
        .args(["mount", "--foreground"])
        .args([&p.backing, &p.mnt])
        .env("NOTIFY_SOCKET", notify_socket)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&p.log).unwrap()))
        .spawn()
        .unwrap()
}

#[test]
fn foreground_mount_tells_systemd_ready_and_stopping() {
    let p = volume("kmsfs-notify", &common::trusted_config());
    let _guard = Unmount(&p.mnt);

    // Abstract socket ('@'), as systemd may pass; stopped by `umount`.
    let name = format!("kmsfs-test-notify-{}", std::process::id());
    let socket =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let mut child = foreground_mount(&p, &format!("@{name}"));
    let ready = receive(&socket, 60);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        mount_options(&p.mnt).is_some(),
        "READY=1 before the mount was up"
    );
    write_read(&p, "notified.txt");
    common::run(&["umount", p.mnt.to_str().unwrap()], true);
    assert_eq!(receive(&socket, 30), "STOPPING=1");
    assert!(
        child.wait().unwrap().success(),
        "the foreground mount failed"
    );

    // A socket path, as systemd's /run/systemd/notify; stopped by SIGTERM,
    // as `systemctl stop` does.
    let path: PathBuf = p.dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut child = foreground_mount(&p, path.to_str().unwrap());
    let ready = receive(&socket, 60);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert_eq!(
        std::fs::read_to_string(p.mnt.join("notified.txt")).unwrap(),
        "through the mount: notified.txt"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(receive(&socket, 30), "STOPPING=1");
    assert!(
        child.wait().unwrap().success(),
        "SIGTERM did not end the mount cleanly"
    );
    assert!(
        mount_options(&p.mnt).is_none(),
        "still mounted after SIGTERM"
    );
}

/// The shipped unit passes `systemd-analyze verify` (with its ExecStart
/// pointing at the binary under test, as /usr/local/bin/kmsfs may not
/// exist here).
#[test]
fn the_systemd_unit_verifies() {
    let dir = common::tempdir("kmsfs-unit");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/systemd/kmsfs@.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("--foreground"));
    let unit = unit.replace("/usr/local/bin/kmsfs", env!("CARGO_BIN_EXE_kmsfs"));
    std::fs::write(dir.path().join("kmsfs@.service"), unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("kmsfs@mnt-secure.service"))
        .output()
        .expect("systemd-analyze (package systemd, which scripts/setup.sh installs)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}
