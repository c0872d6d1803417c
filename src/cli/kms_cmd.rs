//! `kmsfs kms test|status`: whether the KMSs of a backing directory work.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use kmsfs::kms::KmsRuntime;
use kmsfs::policy::normalize_dir;

use super::{is_retryable, load_config, print_json, RetryLater};

#[derive(Subcommand)]
pub enum KmsCmd {
    /// Wrap/unwrap round trip against the KMS of DIR's policy (default /).
    Test {
        backing: PathBuf,
        dir: Option<String>,
    },
    /// Every configured KMS: reachable, authenticated, key present.
    Status { backing: PathBuf },
}

pub fn kms_cmd(action: KmsCmd) -> Result<()> {
    match action {
        KmsCmd::Test { backing, dir } => test(backing, dir),
        KmsCmd::Status { backing } => status(backing),
    }
}

fn test(backing: PathBuf, dir: Option<String>) -> Result<()> {
    let cfg = load_config(&backing)?.1;
    let dir = normalize_dir(dir.as_deref().unwrap_or("/"))?;
    let policy = cfg.policy_for(&dir);
    let rt = KmsRuntime::new()?;
    let provider = policy.kms.build(&rt)?;
    let start = Instant::now();
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

/// Checks every KMS and prints one JSON row each; fails if any failed, as a
/// temporary failure when a retry may fix every one of them.
fn status(backing: PathBuf) -> Result<()> {
    let cfg = load_config(&backing)?.1;
    let rt = KmsRuntime::new()?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for k in cfg.all_kms() {
        let dirs: Vec<&str> = cfg
            .policies
            .iter()
            .filter(|p| &p.kms == k)
            .map(|p| p.dir.as_str())
            .collect();
        let result = k.build(&rt).map_err(anyhow::Error::from).and_then(|p| {
            let start = Instant::now();
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
                let row = serde_json::json!({ "kms": format!("{k:?}"), "policies": dirs, "ok": false, "error": format!("{e:#}") });
                failures.push(e);
                row
            }
        });
    }
    print_json(&rows)?;
    if failures.is_empty() {
        return Ok(());
    }
    let summary = format!("{} KMS(s) failed their check", failures.len());
    if failures.iter().all(is_retryable) {
        return Err(RetryLater(summary).into());
    }
    bail!(summary)
}
