//! Command-line interface: `init`, `mount`, `umount`, `info`, `keys`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use kmsfs::cache::DekCache;
use kmsfs::config::{Config, KmsConfig, CONFIG_VERSION};
use kmsfs::format::names::is_reserved;
use kmsfs::format::{BlockGeometry, BlockLayout, CipherSuite};
use kmsfs::fs::{self, sidecar, MountOptions};
use kmsfs::kms::local::Keyring;
use kmsfs::kms::{KmsError, KmsRuntime, WrapContext};
use kmsfs::metrics::Metrics;
use kmsfs::policy::{normalize_dir, Policy};

/// Exit code for failures a retry may fix (sysexits EX_TEMPFAIL).
const EXIT_TEMPFAIL: i32 = 75;
/// Set in the daemon child: report readiness on stdout.
const READY_ENV: &str = "KMSFS_REPORT_READY";

#[derive(Parser)]
#[command(
    name = "kmsfs",
    version,
    about = "Encrypted FUSE filesystem with per-file keys wrapped by a KMS"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prepare a backing directory (created if needed) and its root key policy.
    Init(InitArgs),
    /// Mount BACKING at MOUNTPOINT; returns once the mount is ready.
    Mount(MountArgs),
    /// Unmount a kmsfs mount.
    Umount { mountpoint: PathBuf },
    /// Print a file's header facts as JSON (never key bytes).
    Info {
        /// A file inside a kmsfs mount, or inside a backing directory.
        path: PathBuf,
        /// Also unwrap the DEK through the KMS and authenticate the header.
        #[arg(long)]
        verify: bool,
    },
    /// Manage a local keyring file.
    Keys {
        #[command(subcommand)]
        action: KeysCmd,
    },
    /// Directory-level key policies (DIR is a path inside the mount, like /pii).
    Policy {
        #[command(subcommand)]
        action: PolicyCmd,
    },
    /// Check the KMSs a backing directory uses.
    Kms {
        #[command(subcommand)]
        action: KmsCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Set the key (and cipher) for new files under DIR.
    Set {
        backing: PathBuf,
        dir: String,
        #[command(flatten)]
        kms: Box<KmsArgs>,
        #[arg(long, default_value = "aes-256-gcm")]
        cipher: CipherSuite,
        /// Let files without a sidecar (plaintext already there) be read and
        /// written as they are; new files are still encrypted.
        #[arg(long)]
        not_mandatory: bool,
        /// Save without a wrap/unwrap round trip against the KMS.
        #[arg(long)]
        no_check: bool,
    },
    /// List all policies as JSON.
    List { backing: PathBuf },
    /// Show the policy governing DIR as JSON.
    Show { backing: PathBuf, dir: String },
    /// Remove the policy of DIR (files keep their keys; the key stays usable).
    Unset { backing: PathBuf, dir: String },
    /// Per policy: how many files are wrapped under its current key, under
    /// another key (created before a policy change), or are plaintext.
    Status { backing: PathBuf },
}

#[derive(Subcommand)]
enum KmsCmd {
    /// Wrap/unwrap round trip against the KMS of DIR's policy (default /).
    Test {
        backing: PathBuf,
        dir: Option<String>,
    },
    /// Every configured KMS: reachable, authenticated, key present.
    Status { backing: PathBuf },
}

/// Flags that name the KMS key protecting new files (for init and policies).
#[derive(Args, Clone)]
struct KmsArgs {
    /// KMS provider of the key that wraps new files' DEKs.
    #[arg(long, value_parser = ["local", "vault", "aws", "azure", "gcp"])]
    kms: String,
    /// local: keyring file (outside the backing directory); created if missing.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// local: key name within the keyring.
    #[arg(long, default_value = "default")]
    key_name: String,

    /// vault: server address, e.g. http://127.0.0.1:8200 (token from VAULT_TOKEN).
    #[arg(long)]
    vault_addr: Option<String>,
    /// vault: transit key name.
    #[arg(long)]
    vault_key: Option<String>,
    /// vault: transit mount path.
    #[arg(long, default_value = "transit")]
    vault_mount: String,
    /// vault: Enterprise namespace.
    #[arg(long)]
    vault_namespace: Option<String>,
    /// vault: auth method.
    #[arg(long, default_value = "token", value_parser = ["token", "approle", "kubernetes"])]
    vault_auth: String,
    /// vault approle: role ID (secret ID from --vault-secret-id-file or VAULT_SECRET_ID).
    #[arg(long)]
    vault_role_id: Option<String>,
    #[arg(long)]
    vault_secret_id_file: Option<PathBuf>,
    /// vault kubernetes: role name.
    #[arg(long)]
    vault_k8s_role: Option<String>,
    /// vault kubernetes: service-account JWT file.
    #[arg(long)]
    vault_k8s_jwt_file: Option<PathBuf>,
    /// vault: auth mount path (default: approle / kubernetes).
    #[arg(long)]
    vault_auth_mount: Option<String>,
    #[arg(long)]
    vault_ca_cert: Option<PathBuf>,
    #[arg(long)]
    vault_client_cert: Option<PathBuf>,
    #[arg(long)]
    vault_client_key: Option<PathBuf>,
    /// vault: do not verify the server's TLS certificate (tests only).
    #[arg(long)]
    vault_skip_verify: bool,

    /// aws: key ID, key ARN or alias (alias/NAME).
    #[arg(long)]
    aws_key_id: Option<String>,
    #[arg(long)]
    aws_region: Option<String>,
    /// aws: custom endpoint (LocalStack, moto).
    #[arg(long)]
    aws_endpoint: Option<String>,
    #[arg(long)]
    aws_profile: Option<String>,
    /// aws: role ARN to assume.
    #[arg(long)]
    aws_assume_role: Option<String>,
    #[arg(long)]
    aws_external_id: Option<String>,

    /// azure: vault URL, e.g. https://NAME.vault.azure.net
    #[arg(long)]
    azure_vault_url: Option<String>,
    #[arg(long)]
    azure_key: Option<String>,
    /// azure: key version (default: latest).
    #[arg(long)]
    azure_key_version: Option<String>,

    #[arg(long)]
    gcp_project: Option<String>,
    #[arg(long)]
    gcp_location: Option<String>,
    #[arg(long)]
    gcp_key_ring: Option<String>,
    #[arg(long)]
    gcp_key: Option<String>,
    #[arg(long)]
    gcp_key_version: Option<String>,
    /// gcp: service-account key file (default: application default credentials).
    #[arg(long)]
    gcp_credentials_file: Option<PathBuf>,
    /// gcp: custom endpoint (tests).
    #[arg(long)]
    gcp_endpoint: Option<String>,
}

#[derive(Args)]
struct InitArgs {
    backing: PathBuf,
    #[command(flatten)]
    kms: Box<KmsArgs>,
    #[arg(long, default_value = "aes-256-gcm")]
    cipher: CipherSuite,
    /// Plaintext block size: a power of two from 4096 to 1048576.
    #[arg(long, default_value_t = 4096)]
    block_size: u64,
}

#[derive(Args)]
struct MountArgs {
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
    /// Serve Prometheus metrics on HOST:PORT (/metrics).
    #[arg(long)]
    metrics_addr: Option<String>,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a keyring (if missing) with a new key.
    Create {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// List keys and versions (never key bytes).
    List {
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Add a new version of a key; new files use it, old versions still unwrap.
    Rotate {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long, default_value = "default")]
        name: String,
    },
}

pub fn run() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Init(a) => init(a),
        Cmd::Mount(a) => mount(a),
        Cmd::Umount { mountpoint } => umount(&mountpoint),
        Cmd::Info { path, verify } => info(&path, verify),
        Cmd::Keys { action } => keys(action),
        Cmd::Policy { action } => policy(action),
        Cmd::Kms { action } => kms_cmd(action),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kmsfs: error: {e:#}");
            let retryable = e.chain().any(|c| {
                c.downcast_ref::<KmsError>()
                    .is_some_and(|k| k.is_retryable())
            });
            if retryable {
                EXIT_TEMPFAIL
            } else {
                1
            }
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}

fn init_logging(level_default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMSFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level_default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Opens (creating if asked) the local keyring and makes sure `name` exists.
fn ensure_local_key(key_file: &Path, name: &str, create: bool) -> Result<()> {
    let mut kr = if key_file.exists() {
        Keyring::load(key_file)?
    } else if create {
        let kr = Keyring::create_empty(key_file)?;
        eprintln!("kmsfs: created keyring {} (mode 0600) — back it up: without it your files are unreadable", key_file.display());
        kr
    } else {
        return Ok(Keyring::load(key_file).map(drop)?);
    };
    if !kr.has_key(name) {
        kr.create_key(name)?;
        eprintln!("kmsfs: created key {name:?} in {}", key_file.display());
    }
    Ok(())
}

#[cfg_attr(
    not(any(feature = "vault", feature = "aws", feature = "azure", feature = "gcp")),
    allow(dead_code)
)]
fn need<'a>(v: &'a Option<String>, flag: &str, kms: &str) -> Result<&'a String> {
    v.as_ref()
        .ok_or_else(|| anyhow!("--kms {kms} needs {flag}"))
}

fn kms_config(args: &KmsArgs, backing: &Path) -> Result<KmsConfig> {
    match args.kms.as_str() {
        "local" => {
            let key_file = args.key_file.as_deref().ok_or_else(|| {
                anyhow!(
                    "--kms local needs --key-file FILE (a keyring outside the backing directory)"
                )
            })?;
            let key_file = absolute(key_file)?;
            if key_file.starts_with(backing) {
                bail!(
                    "the key file {} is inside the backing directory {}; keep keys away from the ciphertext",
                    key_file.display(),
                    backing.display()
                );
            }
            ensure_local_key(&key_file, &args.key_name, true)?;
            Ok(KmsConfig::Local {
                key_file,
                key: args.key_name.clone(),
            })
        }
        #[cfg(feature = "vault")]
        "vault" => {
            use kmsfs::kms::vault::{VaultAuth, VaultConfig};
            let auth = match args.vault_auth.as_str() {
                "approle" => VaultAuth::Approle {
                    role_id: need(&args.vault_role_id, "--vault-role-id", "vault")?.clone(),
                    secret_id_file: args
                        .vault_secret_id_file
                        .as_deref()
                        .map(absolute)
                        .transpose()?,
                    mount: args
                        .vault_auth_mount
                        .clone()
                        .unwrap_or_else(|| "approle".into()),
                },
                "kubernetes" => VaultAuth::Kubernetes {
                    role: need(&args.vault_k8s_role, "--vault-k8s-role", "vault")?.clone(),
                    jwt_file: args.vault_k8s_jwt_file.clone().unwrap_or_else(|| {
                        "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
                    }),
                    mount: args
                        .vault_auth_mount
                        .clone()
                        .unwrap_or_else(|| "kubernetes".into()),
                },
                _ => VaultAuth::Token,
            };
            Ok(KmsConfig::Vault(VaultConfig {
                address: need(&args.vault_addr, "--vault-addr URL", "vault")?.clone(),
                mount: args.vault_mount.clone(),
                key: need(&args.vault_key, "--vault-key NAME", "vault")?.clone(),
                namespace: args.vault_namespace.clone(),
                auth,
                ca_cert: args.vault_ca_cert.as_deref().map(absolute).transpose()?,
                client_cert: args
                    .vault_client_cert
                    .as_deref()
                    .map(absolute)
                    .transpose()?,
                client_key: args.vault_client_key.as_deref().map(absolute).transpose()?,
                skip_verify: args.vault_skip_verify,
                timeout_secs: kmsfs::kms::default_timeout_secs(),
            }))
        }
        #[cfg(feature = "aws")]
        "aws" => Ok(KmsConfig::Aws(kmsfs::kms::aws::AwsConfig {
            key_id: need(&args.aws_key_id, "--aws-key-id ID", "aws")?.clone(),
            region: args.aws_region.clone(),
            endpoint: args.aws_endpoint.clone(),
            profile: args.aws_profile.clone(),
            assume_role_arn: args.aws_assume_role.clone(),
            external_id: args.aws_external_id.clone(),
            timeout_secs: kmsfs::kms::default_timeout_secs(),
        })),
        #[cfg(feature = "azure")]
        "azure" => Ok(KmsConfig::Azure(kmsfs::kms::azure::AzureConfig {
            vault_url: need(&args.azure_vault_url, "--azure-vault-url URL", "azure")?.clone(),
            key_name: need(&args.azure_key, "--azure-key NAME", "azure")?.clone(),
            key_version: args.azure_key_version.clone().filter(|v| !v.is_empty()),
            timeout_secs: kmsfs::kms::default_timeout_secs(),
        })),
        #[cfg(feature = "gcp")]
        "gcp" => Ok(KmsConfig::Gcp(kmsfs::kms::gcp::GcpConfig {
            project: need(&args.gcp_project, "--gcp-project ID", "gcp")?.clone(),
            location: need(&args.gcp_location, "--gcp-location LOC", "gcp")?.clone(),
            key_ring: need(&args.gcp_key_ring, "--gcp-key-ring NAME", "gcp")?.clone(),
            key: need(&args.gcp_key, "--gcp-key NAME", "gcp")?.clone(),
            key_version: args.gcp_key_version.clone(),
            credentials_file: args
                .gcp_credentials_file
                .as_deref()
                .map(absolute)
                .transpose()?,
            endpoint: args.gcp_endpoint.clone(),
            timeout_secs: kmsfs::kms::default_timeout_secs(),
        })),
        other => bail!(
            "KMS {other:?} is not available in this build (compiled without its cargo feature)"
        ),
    }
}

fn init(a: InitArgs) -> Result<()> {
    let backing = absolute(&a.backing)?;
    BlockGeometry::from_size(a.block_size, BlockLayout::V1).map_err(|_| {
        anyhow!(
            "--block-size {} is not a power of two from 4096 to 1048576",
            a.block_size
        )
    })?;
    if backing.exists() && !backing.is_dir() {
        bail!("{} exists and is not a directory", backing.display());
    }
    if Config::path(&backing).exists() {
        bail!(
            "{} is already a kmsfs backing directory; refusing to overwrite its configuration",
            backing.display()
        );
    }
    std::fs::create_dir_all(&backing)
        .with_context(|| format!("cannot create {}", backing.display()))?;
    let kms = kms_config(&a.kms, &backing)?;
    let cfg = Config {
        format_version: CONFIG_VERSION,
        block_size: a.block_size,
        policies: vec![Policy {
            dir: "/".into(),
            cipher: a.cipher,
            mandatory: true,
            kms,
        }],
        retired: vec![],
    };
    cfg.save(&backing)?;
    eprintln!(
        "kmsfs: initialised {} ({}, {}-byte blocks)",
        backing.display(),
        a.cipher.name(),
        a.block_size
    );
    Ok(())
}

/// Mount points currently listed by the kernel, with source and type.
fn mounts() -> Vec<(String, PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mnt = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_owned();
            let source = unescape(r.next()?);
            Some((source, PathBuf::from(unescape(mnt)), fstype))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (\040 for space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn check_mountpoint(mnt: &Path) -> Result<()> {
    let meta = std::fs::metadata(mnt).map_err(|e| anyhow!("mountpoint {}: {e}", mnt.display()))?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mnt.display());
    }
    if mounts().iter().any(|(_, m, _)| m == mnt) {
        bail!(
            "mountpoint {} is busy: something is already mounted there (unmount it first: kmsfs umount {})",
            mnt.display(),
            mnt.display()
        );
    }
    Ok(())
}

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

fn mount(a: MountArgs) -> Result<()> {
    let backing = absolute(&a.backing)?;
    let mountpoint = absolute(&a.mountpoint)?;
    // Everything that can be checked before forking is checked here, so the
    // user sees the reason directly.
    let cfg = Config::load(&backing)?;
    let runtime = KmsRuntime::new()?;
    let metrics = Arc::new(Metrics::default());
    let connected = cfg.connect(&runtime, &metrics)?;
    check_mountpoint(&mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) or install fuse3");
    }
    if !a.foreground {
        return spawn_daemon(&a, &mountpoint);
    }
    init_logging("info");
    raise_fd_limit();
    let (ro, allow_other, extra) = parse_mount_options(&a.options);
    let cache = DekCache::new(a.cache_size, Duration::from_secs(a.cache_ttl));
    unsafe { libc::umask(0) };
    let core = fs::Core::new(&backing, &cfg, connected, cache, runtime, metrics, ro)
        .with_context(|| format!("cannot open backing directory {}", backing.display()))?;
    let opts = MountOptions {
        read_only: ro,
        allow_other,
        threads: a.threads,
        attr_ttl: Duration::from_secs_f64(a.attr_timeout.max(0.0)),
        extra,
        fs_name: format!("kmsfs:{}", backing.display()),
    };
    let core = Arc::new(core);
    if let Some(addr) = &a.metrics_addr {
        let c = core.clone();
        let bound = kmsfs::metrics::serve(addr, Arc::new(move || c.render_metrics()))
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    block_termination_signals();
    let session = match fs::mount(core, &mountpoint, &opts) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("cannot mount at {}: {e}", mountpoint.display());
            report_ready(Err(&msg));
            bail!(msg);
        }
    };
    tracing::info!("mounted {} at {}", backing.display(), mountpoint.display());
    spawn_signal_unmounter(mountpoint.clone());
    report_ready(Ok(()));
    session.run().context("FUSE session failed")?;
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Tells the waiting parent (if any) that the mount is ready or failed.
fn report_ready(r: std::result::Result<(), &str>) {
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

/// Re-runs this command in the foreground as a detached child, and waits for
/// it to report the mount ready or failed.
fn spawn_daemon(a: &MountArgs, mountpoint: &Path) -> Result<()> {
    let log = match &a.log_file {
        Some(p) => absolute(p)?,
        None => {
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
            std::env::temp_dir().join(format!("kmsfs{tag}.log"))
        }
    };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
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
            let mut tail = String::new();
            if other.is_empty() {
                let _ = std::fs::File::open(&log).and_then(|mut f| f.read_to_string(&mut tail));
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                bail!(
                    "the kmsfs daemon exited before the mount was ready; last log lines ({}):\n{}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            bail!("{}", other.trim_start_matches("error: "))
        }
    }
}

/// The daemon holds one O_PATH descriptor per inode the kernel remembers
/// (tens of thousands after an untar): lift the open-files limit as far as
/// the system allows.
fn raise_fd_limit() {
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

fn block_termination_signals() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// On SIGTERM/SIGINT/SIGHUP, unmount cleanly so the session ends and the
/// process exits 0.
fn spawn_signal_unmounter(mountpoint: PathBuf) {
    std::thread::spawn(move || unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        tracing::info!("signal {sig}: unmounting {}", mountpoint.display());
        let _ = unmount_path(&mountpoint, true);
    });
}

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

fn umount(mnt: &Path) -> Result<()> {
    let mnt = absolute(mnt)?;
    if !mounts()
        .iter()
        .any(|(_, m, t)| m == &mnt && t.starts_with("fuse"))
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

/// Maps a path inside a kmsfs mount to the backing path; other paths are
/// taken as backing paths already. Returns (backing file, backing root).
fn backing_path(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} names no file", path.display()))?;
    let dir = std::fs::canonicalize(parent)
        .with_context(|| format!("cannot resolve {}", parent.display()))?;
    let full = dir.join(name);
    let best = mounts()
        .into_iter()
        .filter(|(src, m, t)| {
            t.starts_with("fuse") && src.starts_with("kmsfs:") && full.starts_with(m)
        })
        .max_by_key(|(_, m, _)| m.as_os_str().len());
    if let Some((src, m, _)) = best {
        let root = PathBuf::from(&src["kmsfs:".len()..]);
        let rel = full.strip_prefix(&m).expect("prefix checked");
        return Ok((root.join(rel), Some(root)));
    }
    // A backing path: find the backing root by its config file.
    let root = full
        .ancestors()
        .skip(1)
        .find(|a| Config::path(a).exists())
        .map(Path::to_path_buf);
    Ok((full, root))
}

fn info(path: &Path, verify: bool) -> Result<()> {
    let (file, root) = backing_path(path)?;
    let name = file.file_name().expect("has a name");
    if is_reserved(name.as_bytes()) {
        bail!("{} is kmsfs metadata, not a file", path.display());
    }
    let header = sidecar::read_beside(&file).map_err(|e| {
        anyhow!(
            "{}: no readable kmsfs header ({e}); is it a regular file in a kmsfs mount or backing directory?",
            path.display(),
        )
    })?;
    let parsed = &header.parsed;
    let h = &parsed.header;
    let ct_size = std::fs::metadata(&file).map(|m| m.len()).ok();
    let mut out = serde_json::json!({
        "path": path.display().to_string(),
        "backing_path": file.display().to_string(),
        "format_version": h.version(),
        "cipher": h.cipher.name(),
        "block_size": h.geometry.block_size(),
        "file_id": hex::encode(h.file_id),
        "key": {
            "provider": h.primary().key_ref.provider,
            "key_id": h.primary().key_ref.key_id,
            "key_version": h.primary().key_ref.key_version,
        },
        "wrapped_dek_bytes": h.primary().blob.len(),
        "plaintext_size": ct_size.map(|c| h.geometry.plaintext_size(c)),
        "ciphertext_size": ct_size,
    });
    if verify {
        let root =
            root.ok_or_else(|| anyhow!("cannot find the backing directory of {}", path.display()))?;
        let cfg = Config::load(&root)?;
        let rt = KmsRuntime::new()?;
        let connected = cfg.connect(&rt, &Arc::new(Metrics::default()))?;
        let ctx = WrapContext { file_id: h.file_id };
        let p = connected.providers.for_key(&h.primary().key_ref)?;
        let dek = rt.block_on(p.unwrap(h.primary(), &ctx))?;
        kmsfs::crypto::open_header(parsed, &dek).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        out["header_verified"] = serde_json::Value::Bool(true);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn keys(action: KeysCmd) -> Result<()> {
    match action {
        KeysCmd::Create { key_file, name } => {
            let key_file = absolute(&key_file)?;
            if key_file.exists() {
                let mut kr = Keyring::load(&key_file)?;
                kr.create_key(&name)?;
            } else {
                let mut kr = Keyring::create_empty(&key_file)?;
                kr.create_key(&name)?;
            }
            eprintln!(
                "kmsfs: created key {name:?} (version 1) in {}",
                key_file.display()
            );
        }
        KeysCmd::List { key_file } => {
            let kr = Keyring::load(&key_file)?;
            println!("{}", serde_json::to_string_pretty(&kr.list())?);
        }
        KeysCmd::Rotate { key_file, name } => {
            let mut kr = Keyring::load(&key_file)?;
            let v = kr.rotate(&name)?;
            eprintln!(
                "kmsfs: key {name:?} is now at version {v}; new files use it, older versions still unwrap (running mounts pick it up on their next new key use after remount)"
            );
        }
    }
    Ok(())
}

fn load_config(backing: &Path) -> Result<(PathBuf, Config)> {
    let backing = absolute(backing)?;
    let cfg = Config::load(&backing)?;
    Ok((backing, cfg))
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn policy(action: PolicyCmd) -> Result<()> {
    match action {
        PolicyCmd::Set {
            backing,
            dir,
            kms,
            cipher,
            not_mandatory,
            no_check,
        } => {
            let (backing, mut cfg) = load_config(&backing)?;
            let dir = normalize_dir(&dir)?;
            let kms = kms_config(&kms, &backing)?;
            if !no_check {
                let rt = KmsRuntime::new()?;
                let provider = kms.build(&rt)?;
                rt.block_on(provider.check())
                    .with_context(|| format!("the KMS for {dir} failed a wrap/unwrap round trip (use --no-check to save anyway)"))?;
            }
            cfg.set_policy(Policy {
                dir: dir.clone(),
                cipher,
                mandatory: !not_mandatory,
                kms,
            });
            cfg.save(&backing)?;
            eprintln!(
                "kmsfs: policy for {dir} saved; new files there use it after the next mount. Existing files keep their keys (see `kmsfs policy status`)."
            );
            Ok(())
        }
        PolicyCmd::List { backing } => print_json(&load_config(&backing)?.1.policies),
        PolicyCmd::Show { backing, dir } => {
            let cfg = load_config(&backing)?.1;
            print_json(cfg.policy_for(&normalize_dir(&dir)?))
        }
        PolicyCmd::Unset { backing, dir } => {
            let (backing, mut cfg) = load_config(&backing)?;
            let dir = normalize_dir(&dir)?;
            if dir == "/" {
                bail!("the root policy cannot be removed; replace it with `kmsfs policy set {} / ...`", backing.display());
            }
            if !cfg.unset_policy(&dir) {
                bail!(
                    "there is no policy for {dir} (see `kmsfs policy list {}`)",
                    backing.display()
                );
            }
            cfg.save(&backing)?;
            eprintln!("kmsfs: policy for {dir} removed; its files keep their keys, which stay usable for reading.");
            Ok(())
        }
        PolicyCmd::Status { backing } => policy_status(&backing),
    }
}

/// Counts, per policy, the files under its current key, under other keys,
/// and without a sidecar.
fn policy_status(backing: &Path) -> Result<()> {
    let (backing, cfg) = load_config(backing)?;
    let rt = KmsRuntime::new()?;
    let connected = cfg.connect(&rt, &Arc::new(Metrics::default()))?;
    #[derive(serde::Serialize, Default)]
    struct Row {
        dir: String,
        kms: String,
        mandatory: bool,
        files_on_current_key: u64,
        files_on_other_keys: u64,
        files_without_sidecar: u64,
    }
    let mut rows: Vec<Row> = connected
        .policies
        .iter()
        .map(|p| Row {
            dir: p.policy.dir.clone(),
            kms: p.provider.describe(),
            mandatory: p.policy.mandatory,
            ..Default::default()
        })
        .collect();
    let mut stack = vec![(backing.clone(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let here = if rel.is_empty() {
            "/".to_owned()
        } else {
            rel.clone()
        };
        let policy_idx = kmsfs::policy::governing(&cfg.policies, &here);
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let e = e?;
            let name = e.file_name();
            if is_reserved(name.as_bytes()) {
                continue;
            }
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push((e.path(), format!("{rel}/{}", name.to_string_lossy())));
            } else if ft.is_file() {
                let row = &mut rows[policy_idx];
                match sidecar::read_beside(&e.path()).ok() {
                    None => row.files_without_sidecar += 1,
                    Some(h)
                        if connected.policies[policy_idx]
                            .provider
                            .is_current_key(&h.parsed.header.primary().key_ref) =>
                    {
                        row.files_on_current_key += 1
                    }
                    Some(_) => row.files_on_other_keys += 1,
                }
            }
        }
    }
    print_json(&rows)
}

fn kms_cmd(action: KmsCmd) -> Result<()> {
    match action {
        KmsCmd::Test { backing, dir } => {
            let cfg = load_config(&backing)?.1;
            let dir = normalize_dir(dir.as_deref().unwrap_or("/"))?;
            let policy = cfg.policy_for(&dir);
            let rt = KmsRuntime::new()?;
            let provider = policy.kms.build(&rt)?;
            let start = std::time::Instant::now();
            rt.block_on(provider.check())
                .with_context(|| format!("KMS test for {dir} (policy of {}) failed", policy.dir))?;
            println!(
                "ok: {} (policy of {}): wrap/unwrap round trip in {:.1} ms",
                provider.describe(),
                policy.dir,
                start.elapsed().as_secs_f64() * 1000.0
            );
            Ok(())
        }
        KmsCmd::Status { backing } => {
            let cfg = load_config(&backing)?.1;
            let rt = KmsRuntime::new()?;
            let mut rows = Vec::new();
            let mut failed = 0;
            for k in cfg.all_kms() {
                let dirs: Vec<&str> = cfg
                    .policies
                    .iter()
                    .filter(|p| &p.kms == k)
                    .map(|p| p.dir.as_str())
                    .collect();
                let result = k.build(&rt).map_err(anyhow::Error::from).and_then(|p| {
                    let start = std::time::Instant::now();
                    rt.block_on(p.check())?;
                    Ok((p.describe(), start.elapsed()))
                });
                rows.push(match result {
                    Ok((name, took)) => serde_json::json!({
                        "kms": name, "policies": dirs, "ok": true,
                        "reachable": true, "authenticated": true, "key_present": true,
                        "latency_ms": took.as_secs_f64() * 1000.0,
                    }),
                    Err(e) => {
                        failed += 1;
                        serde_json::json!({ "kms": format!("{k:?}"), "policies": dirs, "ok": false, "error": format!("{e:#}") })
                    }
                });
            }
            print_json(&rows)?;
            if failed > 0 {
                bail!("{failed} KMS(s) failed their check");
            }
            Ok(())
        }
    }
}
