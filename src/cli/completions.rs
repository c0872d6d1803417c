//! `kmsfs completions SHELL` and `kmsfs man`: generated from the command
//! line's own definition, so they always match the commands and flags.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::Cli;

/// Prints the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "kmsfs", &mut std::io::stdout());
    Ok(())
}

/// Prints the kmsfs(1) page to stdout, or with `out` writes one page per
/// command there (kmsfs.1, kmsfs-mount.1, kmsfs-kms-status.1, ...).
pub fn man(out: Option<&Path>) -> Result<()> {
    let cmd = Cli::command();
    match out {
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("cannot print the man page"),
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write man pages to {}", dir.display()))?;
            eprintln!(
                "kmsfs: wrote the man pages to {} (read them with man -l {}/kmsfs.1, or put \
                 them in a man1 directory of your MANPATH)",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
    }
}
