//! `kmsfs kms test|status`: whether the KMSs of a backing directory work.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use kmsfs::kms::KmsRuntime;
use kmsfs::policy::normalize_dir;

use super::{load_config, print_json};

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

/// Checks every KMS and prints one JSON row each; fails if any failed.
fn status(backing: PathBuf) -> Result<()> {
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
