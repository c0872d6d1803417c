//! The trusted configuration on the command line: where it is (`--config`,
//! `KMSFS_CONFIG`, `/etc/kmsfs/kmsfs.toml`), how every command opens a
//! volume through it, `kmsfs providers list`, and `kmsfs upgrade`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use clap::Subcommand;

use kmsfs::audit::AuditLog;
use kmsfs::config::{upgrade as upgrading, Calls, TrustedConfig, Volume, VolumeConfig};
use kmsfs::kms::KmsRuntime;

use super::{absolute, print_json};

static PATH: OnceLock<PathBuf> = OnceLock::new();

/// Records `--config` (or its absence) for the rest of the command.
pub fn set_path(explicit: Option<&Path>) {
    let _ = PATH.set(TrustedConfig::locate(explicit));
}

/// The trusted configuration's path for this command.
pub fn path() -> PathBuf {
    PATH.get_or_init(|| TrustedConfig::locate(None)).clone()
}

/// The trusted configuration, checked.
pub fn load() -> Result<TrustedConfig> {
    Ok(TrustedConfig::load(&path())?)
}

/// The audit log: `explicit` (`--audit-log`), else the trusted
/// configuration's `audit_log`, else none.
pub fn audit_log(explicit: Option<&Path>) -> Result<AuditLog> {
    let path = match explicit {
        Some(p) => Some(absolute(p)?),
        None => TrustedConfig::load(&path())
            .ok()
            .and_then(|t| t.audit_log().map(Path::to_path_buf)),
    };
    Ok(match path {
        Some(p) => AuditLog::open(&p)?,
        None => AuditLog::disabled(),
    })
}

/// The backing directory given on the command line, made absolute, and its
/// volume opened and authenticated, with a runtime for its KMS calls.
pub fn open_volume(backing: &Path, calls: &Calls) -> Result<(Volume, KmsRuntime)> {
    let backing = absolute(backing)?;
    // The volume first: "not a backing directory" is the likelier mistake.
    VolumeConfig::load(&backing)?;
    Ok(kmsfs::config::open_volume(&backing, &load()?, calls)?)
}

#[derive(Subcommand)]
pub enum ProvidersCmd {
    /// List the providers (name, type, settings) as JSON; never secrets,
    /// which the trusted configuration does not hold either.
    List,
}

pub fn providers(action: ProvidersCmd) -> Result<()> {
    match action {
        ProvidersCmd::List => {
            let trusted = load()?;
            let rows: Vec<serde_json::Value> = trusted
                .providers()
                .iter()
                .map(|(name, def)| {
                    serde_json::json!({
                        "name": name,
                        "type": def.kind,
                        "settings": def.settings,
                    })
                })
                .collect();
            print_json(&rows)
        }
    }
}

/// `kmsfs upgrade BACKING`: shows the providers the format 1
/// configuration names and adds them only once the operator confirms
/// (`--yes`, or an answer on a terminal), since they come from the backing
/// directory.
pub fn upgrade(backing: &Path, json: bool, yes: bool) -> Result<()> {
    let backing = absolute(backing)?;
    let trusted_path = path();
    let plan = upgrading::plan(&backing)
        .with_context(|| format!("cannot upgrade {}", backing.display()))?;
    eprintln!(
        "kmsfs: {} is configuration format 1. Its KMS settings come from the backing directory, \
         which others may be able to write; upgrading adds them to {} as these providers \
         (and kmsfs will connect to them and send their credentials):",
        backing.display(),
        trusted_path.display()
    );
    for (def, spec) in &plan.providers {
        let version = spec
            .version
            .as_deref()
            .map(|v| format!(", version {v:?}"))
            .unwrap_or_default();
        eprintln!("  type = {:?}, key {:?}{version}:", def.kind, spec.id);
        // One setting a line, values as TOML writes them (quoted, escaped):
        // a crafted value cannot pass for another setting.
        for (name, value) in &def.settings {
            eprintln!("      {name} = {value}");
        }
    }
    if !yes && !confirmed("Are these your KMSs and credentials?")? {
        anyhow::bail!(
            "nothing changed. Check the settings above; if they are yours, run `kmsfs upgrade {} --yes`",
            backing.display()
        );
    }
    let rt = KmsRuntime::new()?;
    let report = upgrading::upgrade(plan, &backing, &trusted_path, &rt)
        .with_context(|| format!("cannot upgrade {}", backing.display()))?;
    if json {
        return print_json(&report);
    }
    eprintln!(
        "kmsfs: upgraded {} to configuration format 2; its KMS settings are now providers in {}:",
        backing.display(),
        trusted_path.display()
    );
    for (name, settings, added) in &report.providers {
        let how = if *added { "added" } else { "already there" };
        eprintln!(
            "  [providers.{name}] ({how}): {}",
            settings.trim().replace('\n', ", ")
        );
    }
    eprintln!(
        "  {} files; {} under keys no configured KMS holds; {} without a header. The old configuration is kept as {}.",
        report.files,
        report.files_under_unknown_keys,
        report.files_without_header,
        upgrading::FORMAT_ONE_BACKUP
    );
    Ok(())
}

/// Asks `question` on the terminal; false without one (scripts say
/// `--yes`).
fn confirmed(question: &str) -> Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
