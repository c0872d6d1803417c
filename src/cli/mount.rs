//! `kmsfs mount`: checks everything it can up front, then either serves the
//! mount in this process (`--foreground`) or starts the daemon that does
//! (see `daemon`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use kmsfs::cache::DekCache;
use kmsfs::config::Calls;
use kmsfs::fs::{self, MountOptions};
use kmsfs::metrics::Metrics;

use super::mount_options::{self, MountOpt, Resolved, Setting};
use super::{absolute, daemon, helper, mount_claim, mountinfo, trust};

#[derive(Args)]
#[command(
    after_help = "Every setting can also come from the environment (KMSFS_THREADS, \
KMSFS_CACHE_SIZE, KMSFS_CACHE_TTL, KMSFS_DEK_POOL, KMSFS_ATTR_TIMEOUT, KMSFS_METRICS_ADDR, KMSFS_AUDIT_LOG, \
KMSFS_LOG_FILE; KMSFS_OPTIONS for -o items) or the [mount] table of the trusted \
configuration (threads = 8, options = [\"allow_other\"], ...). The command line wins over \
the environment, which wins over the file. See docs/MOUNTING.md."
)]
pub struct MountArgs {
    backing: PathBuf,
    mountpoint: PathBuf,
    /// Stay in the foreground (logs to stderr; tells systemd when the
    /// mount is ready through $NOTIFY_SOCKET).
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Mount options, comma separated, as in fstab: ro, rw, allow_other,
    /// noexec, sync, dirsync, ...; the settings below as NAME=VALUE
    /// (cache_size=1000, log_file=FILE, ...) and config=FILE. Options for
    /// mount(8) and systemd (_netdev, nofail, x-systemd.*, ...) are
    /// accepted and have no effect here.
    #[arg(short = 'o', long = "options", value_delimiter = ',',
          value_parser = mount_options::parse_option, value_name = "OPTION")]
    options: Vec<MountOpt>,
    /// Log file of the background daemon.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// FUSE worker threads [default: 8].
    #[arg(long)]
    threads: Option<usize>,
    /// DEK cache capacity (entries) [default: 100000].
    #[arg(long)]
    cache_size: Option<usize>,
    /// DEK cache time-to-live, seconds [default: 3600].
    #[arg(long)]
    cache_ttl: Option<u64>,
    /// Pre-wrapped DEKs kept per remote KMS key, so that creating a file
    /// waits on no KMS call; 0 turns the pool off [default: 512].
    #[arg(long)]
    dek_pool: Option<usize>,
    /// Kernel attribute/entry cache timeout, seconds [default: 1].
    #[arg(long)]
    attr_timeout: Option<f64>,
    /// Serve Prometheus metrics (/metrics), liveness (/health) and
    /// readiness (/ready) on HOST:PORT.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Log every key operation as a JSON line to FILE (default: the
    /// trusted configuration's `audit_log`, if set).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
}

impl MountArgs {
    /// The trusted configuration `-o config=FILE` names (the last one).
    pub fn config_option(&self) -> Option<&Path> {
        self.options.iter().rev().find_map(|o| match o {
            MountOpt::Config(p) => Some(p.as_path()),
            _ => None,
        })
    }

    /// The command line's settings and options: flags first, so that an
    /// `-o` item wins over its flag.
    fn command_line(&self) -> Vec<MountOpt> {
        let flags = [
            self.threads.map(Setting::Threads),
            self.cache_size.map(Setting::CacheSize),
            self.cache_ttl.map(Setting::CacheTtl),
            self.dek_pool.map(Setting::DekPool),
            self.attr_timeout.map(Setting::AttrTimeout),
            self.metrics_addr.clone().map(Setting::MetricsAddr),
            self.audit_log.clone().map(Setting::AuditLog),
            self.log_file.clone().map(Setting::LogFile),
        ];
        flags
            .into_iter()
            .flatten()
            .map(MountOpt::Setting)
            .chain(self.options.iter().cloned())
            .collect()
    }
}

/// The mount's settings from every source (see `mount_options`).
fn settings(a: &MountArgs) -> Result<Resolved> {
    let path = trust::path();
    // A missing or unsafe trusted configuration is reported when the volume
    // is opened, with what to do; its [mount] table is then moot.
    let table = kmsfs::config::TrustedConfig::load(&path)
        .map(|t| t.mount_settings().clone())
        .unwrap_or_default();
    mount_options::resolve(&table, &path, |v| std::env::var(v).ok(), &a.command_line())
}

pub fn mount(a: MountArgs) -> Result<()> {
    if a.foreground {
        // Before any thread starts (the KMS runtime's first): threads inherit
        // the mask, and a signal taken by a thread that does not block it
        // ends the process without unmounting.
        daemon::block_termination_signals();
    }
    let backing = absolute(&a.backing)?;
    let mountpoint = absolute(&a.mountpoint)?;
    // Everything that can be checked before forking is checked here, so the
    // user sees the reason directly.
    let metrics = Arc::new(Metrics::default());
    if let Some(why) = super::migrate::unfinished(&backing) {
        bail!(why);
    }
    let (volume, runtime) = trust::open_volume(&backing, &Calls::Mount(metrics.clone()))?;
    let set = settings(&a)?;
    let audit = trust::audit_log(set.audit_log.as_deref())?;
    if already_mounted(&mountpoint, &backing)? {
        eprintln!(
            "kmsfs: {} is already mounted at {}",
            backing.display(),
            mountpoint.display()
        );
        return Ok(());
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) or install fuse3");
    }
    // Checked here for a message on the terminal; the daemon holds it.
    let volume_lock = share_volume_lock(&backing)?;
    let claim = mount_claim::claim(
        &backing,
        &mountpoint,
        mount_claim::MountKind::of(set.read_only, set.shared),
    )?;
    if !a.foreground {
        drop((volume_lock, claim));
        return daemon::spawn(set.log_file.as_deref(), &mountpoint);
    }
    daemon::init_logging("info");
    daemon::raise_fd_limit();
    let ro = set.read_only;
    let cache = DekCache::new(set.cache_size, set.cache_ttl);
    // The adapter applies each caller's umask; the daemon's own must not
    // mask the backing files' modes a second time.
    unsafe { libc::umask(0) };
    let core = fs::Core::new(
        &backing,
        &volume.config,
        volume.policies.clone(),
        cache,
        runtime,
        metrics.clone(),
        ro,
    )
    .with_context(|| format!("cannot open backing directory {}", backing.display()))?
    .with_shared(set.shared);
    let audit = Arc::new(audit);
    volume.set_audit_log(audit.clone());
    core.set_audit_log(audit);
    core.set_dek_pool(set.dek_pool);
    core.set_reloader(reloader(volume, metrics));
    let opts = MountOptions {
        read_only: ro,
        shared: set.shared,
        allow_other: set.allow_other,
        threads: set.threads,
        attr_ttl: set.attr_timeout,
        extra: set.kernel_flags(),
        fs_name: format!("kmsfs:{}", backing.display()),
    };
    match core.runtime().block_on(core.settle_interrupted_truncates()) {
        Ok(0) => {}
        Ok(n) => tracing::info!("settled {n} truncate(s) interrupted by a crash"),
        Err(e) => tracing::warn!("cannot look for truncates interrupted by a crash: {e}"),
    }
    let core = Arc::new(core);
    // Whether the FUSE session is up, for /ready.
    let mounted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = &set.metrics_addr {
        let endpoints = kmsfs::metrics::Endpoints::for_mount(core.clone(), mounted.clone());
        let bound = kmsfs::metrics::serve(addr, endpoints)
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!("metrics on http://{bound}/metrics, health on /health and /ready");
    }
    let session = match fs::mount(core, &mountpoint, &opts) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("cannot mount at {}: {e}", mountpoint.display());
            daemon::report_ready(Err(&msg));
            bail!(msg);
        }
    };
    tracing::info!("mounted {} at {}", backing.display(), mountpoint.display());
    daemon::unmount_on_termination_signal(mountpoint.clone());
    mounted.store(true, std::sync::atomic::Ordering::Release);
    daemon::report_ready(Ok(()));
    daemon::notify_systemd(&format!(
        "READY=1\nSTATUS=mounted {} at {}",
        backing.display(),
        mountpoint.display()
    ));
    let served = session.run();
    mounted.store(false, std::sync::atomic::Ordering::Release);
    daemon::notify_systemd("STOPPING=1");
    served.context("FUSE session failed")?;
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// The volume lock, shared, held for as long as the mount is up: `kmsfs
/// fsck --repair` takes it exclusively, so a repair and a mount exclude each
/// other. A backing directory that cannot hold the lock file (read-only)
/// cannot be repaired either, and mounts without it.
fn share_volume_lock(backing: &Path) -> Result<Option<std::fs::File>> {
    match kmsfs::config::VolumeConfig::try_lock_volume(backing, true) {
        Ok(Some(lock)) => Ok(Some(lock)),
        Ok(None) => bail!(
            "`kmsfs fsck --repair` is repairing {}; mount it when the repair has ended",
            backing.display()
        ),
        Err(kmsfs::config::ConfigError::Io { source, .. })
            if matches!(source.raw_os_error(), Some(libc::EROFS | libc::EACCES)) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Checks that `mnt` can take the mount. True when it already has this
/// very mount and mount(8) runs us: `mount -a` runs the helper for every
/// fstab line whose mount it does not recognise, and it cannot recognise a
/// kmsfs mount (the kernel lists it as `fuse`, source `kmsfs:BACKING`).
fn already_mounted(mnt: &Path, backing: &Path) -> Result<bool> {
    let meta =
        std::fs::metadata(mnt).map_err(|e| anyhow::anyhow!("mountpoint {}: {e}", mnt.display()))?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mnt.display());
    }
    if let Some(m) = mountinfo::mounts().iter().find(|m| m.mountpoint == mnt) {
        if helper::invoked_as_helper() && m.kmsfs_backing() == Some(backing) {
            return Ok(true);
        }
        bail!(
            "mountpoint {} is busy: something is already mounted there (unmount it first: kmsfs umount {})",
            mnt.display(),
            mnt.display()
        );
    }
    Ok(false)
}

/// How the mount takes up a change to the volume's policies (`kmsfs policy
/// set/unset` while mounted): when the configuration file changed, it is
/// read again, checked under the volume key, and its new keys connected
/// through the trusted configuration as it is now. A change that cannot be
/// used (a KMS unreachable, a configuration that fails its checks) is
/// logged, the mount keeps its policies, and it is tried again at most
/// every few seconds.
struct LiveConfig {
    path: PathBuf,
    metrics: Arc<Metrics>,
    state: std::sync::Mutex<LiveState>,
}

struct LiveState {
    /// The configuration file as last taken up.
    applied: Option<Stamp>,
    last_failure: Option<std::time::Instant>,
    volume: kmsfs::config::Volume,
}

type Stamp = (u64, u64, i64, i64);

/// How long a change that could not be used waits before it is tried again.
const RELOAD_RETRY: Duration = Duration::from_secs(5);

impl fs::PolicySource for LiveConfig {
    fn stale(&self) -> bool {
        match self.state.try_lock() {
            Ok(s) => {
                stamp(&self.path) != s.applied
                    && s.last_failure.is_none_or(|t| t.elapsed() >= RELOAD_RETRY)
            }
            // Another thread is taking it up.
            Err(_) => false,
        }
    }

    fn reload(&self, rt: &kmsfs::kms::KmsRuntime) -> Option<Vec<kmsfs::config::ActivePolicy>> {
        let mut state = match self.state.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let now = stamp(&self.path);
        if now == state.applied {
            return None;
        }
        let reloaded = trust::load()
            .map_err(|e| format!("{e:#}"))
            .and_then(|trusted| {
                state
                    .volume
                    .reload(&trusted, rt, &Calls::Mount(self.metrics.clone()))
                    .map_err(|e| e.to_string())
            });
        match reloaded {
            Ok(changed) => {
                state.applied = now;
                state.last_failure = None;
                if changed {
                    tracing::info!(
                        "the volume configuration changed and was read again; new files follow \
                         its policies from now on"
                    );
                }
                changed.then(|| state.volume.policies.clone())
            }
            Err(e) => {
                state.last_failure = Some(std::time::Instant::now());
                tracing::warn!(
                    "the volume configuration changed but cannot be used yet, so the mount keeps \
                     its policies (tried again in {} s): {e}",
                    RELOAD_RETRY.as_secs()
                );
                None
            }
        }
    }
}

/// A volume configuration file's identity and version, to notice a change
/// with one stat.
fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

fn reloader(volume: kmsfs::config::Volume, metrics: Arc<Metrics>) -> fs::Reloader {
    let path = kmsfs::config::VolumeConfig::path(&volume.backing);
    Box::new(LiveConfig {
        state: std::sync::Mutex::new(LiveState {
            applied: stamp(&path),
            last_failure: None,
            volume,
        }),
        path,
        metrics,
    })
}
