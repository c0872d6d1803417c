//! The mount's daemon and its lifetime: starting it in the background and
//! waiting for it to report the mount ready, the serving process's logging
//! and open-files limit, telling systemd (sd_notify), unmounting on
//! SIGTERM/SIGINT/SIGHUP, and `kmsfs umount`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

use super::{absolute, mountinfo};

/// Set in the daemon child: report readiness on stdout.
const READY_ENV: &str = "KMSFS_REPORT_READY";

/// Signals that end the mount: each unmounts cleanly, so the session ends
/// and the process exits 0.
const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Re-runs this command in the foreground as a detached child, logging to
/// `log_file` (default: one per mountpoint in a private state directory,
/// see `default_log_file`), and waits for it to report the mount ready or
/// failed.
pub fn spawn(log_file: Option<&Path>, mountpoint: &Path) -> Result<()> {
    let log = match log_file {
        Some(p) => absolute(p)?,
        None => default_log_file(mountpoint)?,
    };
    let log_file =
        open_log(&log).with_context(|| format!("cannot open log file {}", log.display()))?;
    // The command line as understood (mount(8)'s helper form translated).
    let mut args: Vec<OsString> = super::helper::command_line()
        .iter()
        .skip(1)
        .cloned()
        .collect();
    args.push("--foreground".into());
    let mut child = unsafe {
        Command::new(std::env::current_exe()?)
            .args(&args)
            .env(READY_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .pre_exec(|| {
                libc::setsid();
                Ok(())
            })
            .spawn()
            .context("cannot start the kmsfs daemon")?
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    match line.trim() {
        "ready" => {
            eprintln!(
                "kmsfs: mounted at {} (log: {})",
                mountpoint.display(),
                log.display()
            );
            Ok(())
        }
        other => {
            let _ = child.wait();
            if other.is_empty() {
                bail!(
                    "the kmsfs daemon exited before the mount was ready; last log lines ({}):\n{}",
                    log.display(),
                    last_lines(&log, 5)
                );
            }
            bail!("{}", other.trim_start_matches("error: "))
        }
    }
}

/// Opens (creating it mode 0600) the daemon's log for appending, not
/// through a symlink: the daemon runs as root, and a symlink planted at the
/// log's name would have it append to any file.
fn open_log(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
}

/// Where the background daemon logs by default: not a predictable name in
/// a directory others can write to (such as /tmp, where another user could
/// plant a symlink or a file of theirs), but a private state directory,
/// /var/log/kmsfs for root and `$XDG_STATE_HOME/kmsfs` (else
/// `~/.local/state/kmsfs`) for other users.
fn log_dir() -> Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/log/kmsfs"));
    }
    let absolute_var = |name| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(state) = absolute_var("XDG_STATE_HOME") {
        return Ok(state.join("kmsfs"));
    }
    let home = absolute_var("HOME").ok_or_else(|| {
        anyhow!("HOME is not set, so there is no place for the log; pass --log-file FILE")
    })?;
    Ok(home.join(".local/state/kmsfs"))
}

/// `<log_dir>/kmsfs_mnt_path.log` for mountpoint /mnt/path; the directory is
/// created mode 0700 and must be this user's, writable by no one else.
fn default_log_file(mountpoint: &Path) -> Result<PathBuf> {
    let dir = log_dir()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(&dir)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
        bail!(
            "the log directory {} must be a directory owned by uid {euid} that no one else can \
             write to; fix it (chmod 700) or pass --log-file FILE",
            dir.display()
        );
    }
    let tag: String = mountpoint
        .as_os_str()
        .as_bytes()
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '_'
            }
        })
        .collect();
    Ok(dir.join(format!("kmsfs{tag}.log")))
}

/// The last `n` lines of the file at `path` (empty if unreadable).
fn last_lines(path: &Path, n: usize) -> String {
    let mut text = String::new();
    let _ = std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text));
    let tail: Vec<&str> = text.lines().rev().take(n).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Tells the waiting parent (if any) that the mount is ready or failed.
pub fn report_ready(r: std::result::Result<(), &str>) {
    if std::env::var_os(READY_ENV).is_none() {
        return;
    }
    let mut out = std::io::stdout();
    let _ = match r {
        Ok(()) => writeln!(out, "ready"),
        Err(msg) => writeln!(out, "error: {msg}"),
    };
    let _ = out.flush();
    // Detach from the parent's pipe.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}

/// Sends `state` (such as "READY=1") to the service manager when it asked
/// for it through $NOTIFY_SOCKET: one datagram on that Unix socket, a
/// name starting with '@' being in the abstract namespace (systemd's
/// sd_notify protocol). Best effort: the mount works without it.
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.as_bytes();
    let addr = match target.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(target)),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!("cannot tell the service manager {state:?} through NOTIFY_SOCKET: {e}");
    }
}

/// Stderr for log lines, where a line that cannot be written (the disk
/// under the log is full) is dropped and counts as written, so that no
/// layer above reacts to the failure.
struct DroppingStderr;

impl Write for DroppingStderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Logs to stderr (the log file, for the daemon) at `level_default` unless
/// KMSFS_LOG says otherwise. A log line that cannot be written (its disk
/// is full) is dropped: tracing would report the failure with `eprintln!`
/// on that same stderr, and a failed `eprintln!` panics, which took the
/// mount down (ECONNABORTED, then ENOTCONN, for every program using it).
pub fn init_logging(level_default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMSFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level_default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| DroppingStderr)
        .with_ansi(false)
        .log_internal_errors(false)
        .try_init();
}

/// The daemon holds one O_PATH descriptor per inode the kernel remembers
/// (tens of thousands after an untar): lift the open-files limit as far as
/// the system allows.
pub fn raise_fd_limit() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let get = || {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let set = |lim: &libc::rlimit| unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, lim) } == 0;
    let Some(cur) = get() else {
        tracing::warn!("cannot read the open-files limit; keeping it");
        return;
    };
    let want = libc::rlimit {
        rlim_cur: nr_open,
        rlim_max: nr_open.max(cur.rlim_max),
    };
    // Not privileged: settle for the hard limit.
    if !set(&want) {
        set(&libc::rlimit {
            rlim_cur: cur.rlim_max,
            rlim_max: cur.rlim_max,
        });
    }
    if let Some(now) = get() {
        tracing::info!("open-files limit {}", now.rlim_cur);
    }
}

fn termination_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only writes to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in this thread and the threads it starts
/// afterwards, so that only the thread of [`unmount_on_termination_signal`]
/// takes them.
pub fn block_termination_signals() {
    let set = termination_signal_set();
    // SAFETY: the set is initialised; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// On SIGTERM/SIGINT/SIGHUP, unmount cleanly so the session ends and the
/// process exits 0.
pub fn unmount_on_termination_signal(mountpoint: PathBuf) {
    std::thread::spawn(move || {
        let set = termination_signal_set();
        let mut sig = 0;
        // SAFETY: both pointers are to live locals.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!("signal {sig}: unmounting {}", mountpoint.display());
        let _ = unmount_path(&mountpoint, true);
    });
}

/// `kmsfs umount`.
pub fn umount(mnt: &Path) -> Result<()> {
    let mnt = absolute(mnt)?;
    if !mountinfo::mounts()
        .iter()
        .any(|m| m.mountpoint == mnt && m.is_fuse())
    {
        bail!("{} is not a FUSE mount point", mnt.display());
    }
    unmount_path(&mnt, false).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => anyhow!(
            "{} is busy: a process still uses it (see `fuser -vm {}`); close it and retry",
            mnt.display(),
            mnt.display()
        ),
        _ => anyhow!("cannot unmount {}: {e}", mnt.display()),
    })
}

/// Unmounts `mnt` (`lazy`: detach now, finish when no longer busy); as root
/// directly, otherwise through fusermount3.
fn unmount_path(mnt: &Path, lazy: bool) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mnt.as_os_str().as_bytes())?;
    if unsafe { libc::geteuid() } == 0 {
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
            return Ok(());
        }
        return Err(std::io::Error::last_os_error());
    }
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let st = cmd.arg(mnt).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("fusermount3 -u failed"))
    }
}
