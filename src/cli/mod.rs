//! The `kmsfs` command line. Here: the commands' clap types, and how a
//! failure ends (one message on stderr, one exit code). Elsewhere:
//! - `init`, `keys`, `policy`, `kms_cmd` (`kms test|status`): those commands;
//! - `mount`: the mount command, `mount_options` its options and where
//!   they come from, `helper` mount(8)'s helper form; `daemon`: the
//!   background daemon (start, readiness, signals) and `umount`;
//! - `inspect`: `info` and `policy status`, over `kmsfs::fs::walk`;
//! - `kms_args`: the flags naming a KMS key (`init`, `policy set`);
//! - `trust`: the trusted configuration (`providers`, `upgrade`, and how
//!   every command finds and opens a volume);
//! - `transfer`: `cat`, `export` and `import`, over the library
//!   (`kmsfs::Volume`), without a mount;
//! - `migrate`: `migrate [--rollback]`, encrypting a directory in place;
//! - `fsck`: `fsck [--repair] [--verify]`, over `kmsfs::lifecycle::fsck`;
//! - `mountinfo`: what is mounted where;
//! - `completions`: shell completions and man pages.

mod completions;
mod daemon;
mod fsck;
mod helper;
mod init;
mod inspect;
mod keys;
mod kms_args;
mod kms_cmd;
mod lifecycle;
mod migrate;
mod mount;
mod mount_claim;
mod mount_options;
mod mountinfo;
mod policy;
mod transfer;
mod trust;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use kmsfs::config::{ConfigError, ConnectError};
use kmsfs::kms::KmsError;

/// Exit codes; a usage error exits 2, through clap.
const EXIT_OK: i32 = 0;
const EXIT_FAILURE: i32 = 1;
/// A retry may fix it, e.g. a KMS was unreachable (EX_TEMPFAIL).
const EXIT_TEMPFAIL: i32 = 75;

#[derive(Parser)]
#[command(
    name = "kmsfs",
    version,
    about = "Encrypted FUSE filesystem with per-file keys wrapped by a KMS"
)]
struct Cli {
    /// The trusted configuration: where KMS keys live (default
    /// $KMSFS_CONFIG, else /etc/kmsfs/kmsfs.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prepare a backing directory (created if needed) and its root key policy.
    Init(init::InitArgs),
    /// Mount BACKING at MOUNTPOINT; returns once the mount is ready.
    Mount(mount::MountArgs),
    /// Install /sbin/mount.fuse.kmsfs, so mount(8) and fstab mount kmsfs.
    InstallHelper(helper::InstallArgs),
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
    /// Keys where they live: list, rotate, status, destroy (and local
    /// keyring files).
    Keys {
        #[command(subcommand)]
        action: keys::KeysCmd,
    },
    /// Directory-level key policies (DIR is a path inside the mount, like /pii).
    Policy {
        #[command(subcommand)]
        action: policy::PolicyCmd,
    },
    /// Check the KMSs a backing directory uses.
    Kms {
        #[command(subcommand)]
        action: kms_cmd::KmsCmd,
    },
    /// The KMS providers of the trusted configuration.
    Providers {
        #[command(subcommand)]
        action: trust::ProvidersCmd,
    },
    /// Wrap every file's DEK again under its policy's current key (after a
    /// rotation or a policy change); data is not touched. Safe while
    /// mounted, resumable.
    Rewrap(lifecycle::RewrapArgs),
    /// Give every file a new DEK and file ID, re-encrypting its data (after
    /// a DEK leaked). Safe while mounted (files open in a mount are skipped:
    /// run it again), resumable.
    Rekey(lifecycle::PassArgs),
    /// Rotate policy keys where they live (--due: those past their
    /// rotate_after), then rewrap.
    Rotate(lifecycle::RotateArgs),
    /// Print files of a volume (paths inside it, like /d/e/x) as plaintext,
    /// without a mount.
    Cat(transfer::CatArgs),
    /// Decrypt a volume's directory (default /) into a new plaintext
    /// directory OUT, without a mount: modes, times, owners (as root),
    /// symlinks, hard links and extended attributes are kept.
    Export(transfer::ExportArgs),
    /// Encrypt plaintext directory SRC into a volume (at DIR, default /),
    /// without a mount, keeping what export keeps.
    Import(transfer::ImportArgs),
    /// Print the shell completion script for SHELL (bash, zsh, fish, ...)
    /// to stdout, e.g. `kmsfs completions bash > /etc/bash_completion.d/kmsfs`.
    Completions { shell: clap_complete::Shell },
    /// Print the kmsfs(1) man page, or write one page per command to DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Check a backing directory for orphan sidecars, files without a
    /// header, bad sidecars, torn tails and leftover temporary files
    /// (--verify: also headers and data through the KMS); --repair fixes
    /// what is safe. Exit 0 clean, 1 problems found, 4 problems left after
    /// --repair, 75 a KMS unreachable.
    Fsck(fsck::FsckArgs),
    /// Encrypt a plaintext directory in place, file by file, making it a
    /// backing directory (resumable); --rollback decrypts it back.
    Migrate(migrate::MigrateArgs),
    /// Upgrade a format 1 backing directory: move its KMS settings into the
    /// trusted configuration and authenticate its configuration.
    Upgrade {
        backing: PathBuf,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
        /// Add the KMS settings the backing directory names to the trusted
        /// configuration without asking (check them first: they come from
        /// the backing directory).
        #[arg(long)]
        yes: bool,
    },
}

/// Runs the command line's command; returns the process exit code.
pub fn run() -> i32 {
    let cli = Cli::parse_from(helper::command_line());
    let mount_config = match &cli.command {
        Cmd::Mount(a) => a.config_option(),
        _ => None,
    };
    trust::set_path(mount_config.or(cli.config.as_deref()));
    let result = match cli.command {
        Cmd::Init(a) => init::init(a),
        Cmd::Mount(a) => mount::mount(a),
        Cmd::InstallHelper(a) => helper::install(a),
        Cmd::Umount { mountpoint } => daemon::umount(&mountpoint),
        Cmd::Info { path, verify } => inspect::info(&path, verify),
        Cmd::Keys { action } => keys::keys(action),
        Cmd::Policy { action } => policy::policy(action),
        Cmd::Kms { action } => kms_cmd::kms_cmd(action),
        Cmd::Providers { action } => trust::providers(action),
        Cmd::Upgrade { backing, json, yes } => trust::upgrade(&backing, json, yes),
        Cmd::Rewrap(a) => lifecycle::rewrap_cmd(a),
        Cmd::Rekey(a) => lifecycle::rekey_cmd(a),
        Cmd::Rotate(a) => lifecycle::rotate_cmd(a),
        Cmd::Cat(a) => transfer::cat(a),
        Cmd::Export(a) => transfer::export(a),
        Cmd::Import(a) => transfer::import(a),
        Cmd::Completions { shell } => completions::completions(shell),
        Cmd::Man { out } => completions::man(out.as_deref()),
        Cmd::Migrate(a) => migrate::migrate_cmd(a),
        Cmd::Fsck(a) => fsck::fsck_cmd(a),
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("kmsfs: error: {e:#}");
            if let Some(exit) = e.downcast_ref::<ExitWith>() {
                exit.code
            } else if is_retryable(&e) {
                EXIT_TEMPFAIL
            } else {
                EXIT_FAILURE
            }
        }
    }
}

/// A failure already described in full by its message (for a command that
/// sums up several failures in one line), that a retry may fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RetryLater(String);

/// A failure already described in full by its message, that ends the
/// process with an exit code of its own (`fsck`'s 4).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct ExitWith {
    code: i32,
    message: String,
}

/// Whether trying the command again later may succeed: some cause in the
/// chain is a retryable KMS failure, or a [`RetryLater`]. `ConfigError` and
/// `ConnectError` wrap a `KmsError` transparently (it is no link of the
/// chain of its own), so they are asked too.
fn is_retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<KmsError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<ConfigError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<ConnectError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<kmsfs::lifecycle::LifecycleError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<kmsfs::lifecycle::fsck::FsckError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<kmsfs::volume::VolumeError>() {
            e.is_retryable()
        } else {
            cause.is::<RetryLater>()
        }
    })
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
