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

use super::{absolute, daemon, mountinfo, trust};

#[derive(Args)]
pub struct MountArgs {
    backing: PathBuf,
    mountpoint: PathBuf,
    /// Stay in the foreground (logs to stderr).
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Mount options, comma separated: ro, allow_other, or kernel options.
    #[arg(short = 'o', value_delimiter = ',')]
    options: Vec<String>,
    /// Log file of the background daemon.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// DEK cache capacity (entries).
    #[arg(long, default_value_t = 100_000)]
    cache_size: usize,
    /// DEK cache time-to-live, seconds.
    #[arg(long, default_value_t = 3600)]
    cache_ttl: u64,
    /// Kernel attribute/entry cache timeout, seconds.
    #[arg(long, default_value_t = 1.0)]
    attr_timeout: f64,
    /// Serve Prometheus metrics (/metrics), liveness (/health) and
    /// readiness (/ready) on HOST:PORT.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Log every key operation as a JSON line to FILE (default: the
    /// trusted configuration's `audit_log`, if set).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
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
    let (volume, runtime) = trust::open_volume(&backing, &Calls::Mount(metrics.clone()))?;
    let audit = trust::audit_log(a.audit_log.as_deref())?;
    check_mountpoint(&mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) or install fuse3");
    }
    if !a.foreground {
        return daemon::spawn(a.log_file.as_deref(), &mountpoint);
    }
    daemon::init_logging("info");
    daemon::raise_fd_limit();
    let (ro, allow_other, extra) = parse_mount_options(&a.options);
    let cache = DekCache::new(a.cache_size, Duration::from_secs(a.cache_ttl));
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
    .with_context(|| format!("cannot open backing directory {}", backing.display()))?;
    core.set_audit_log(Arc::new(audit));
    core.set_reloader(reloader(volume, metrics));
    let opts = MountOptions {
        read_only: ro,
        allow_other,
        threads: a.threads,
        attr_ttl: Duration::from_secs_f64(a.attr_timeout.max(0.0)),
        extra,
        fs_name: format!("kmsfs:{}", backing.display()),
    };
    let core = Arc::new(core);
    // Whether the FUSE session is up, for /ready.
    let mounted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = &a.metrics_addr {
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
    let served = session.run();
    mounted.store(false, std::sync::atomic::Ordering::Release);
    served.context("FUSE session failed")?;
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(())
}

fn check_mountpoint(mnt: &Path) -> Result<()> {
    let meta =
        std::fs::metadata(mnt).map_err(|e| anyhow::anyhow!("mountpoint {}: {e}", mnt.display()))?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mnt.display());
    }
    if mountinfo::mounts().iter().any(|m| m.mountpoint == mnt) {
        bail!(
            "mountpoint {} is busy: something is already mounted there (unmount it first: kmsfs umount {})",
            mnt.display(),
            mnt.display()
        );
    }
    Ok(())
}

/// Splits `-o` options into (read-only, allow_other, options passed to the
/// kernel as they are); a later ro/rw wins.
fn parse_mount_options(opts: &[String]) -> (bool, bool, Vec<String>) {
    let (mut ro, mut allow_other, mut extra) = (false, false, Vec::new());
    for o in opts.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        match o {
            "ro" => ro = true,
            "rw" => ro = false,
            "allow_other" => allow_other = true,
            other => extra.push(other.to_owned()),
        }
    }
    (ro, allow_other, extra)
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
