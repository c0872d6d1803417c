//! `kmsfs keys`: the local provider's keyring file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use kmsfs::kms::local::Keyring;

use super::{absolute, print_json};

#[derive(Subcommand)]
pub enum KeysCmd {
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

pub fn keys(action: KeysCmd) -> Result<()> {
    match action {
        KeysCmd::Create { key_file, name } => {
            let key_file = absolute(&key_file)?;
            let mut keyring = if key_file.exists() {
                Keyring::load(&key_file)?
            } else {
                Keyring::create_empty(&key_file)?
            };
            keyring.create_key(&name)?;
            eprintln!(
                "kmsfs: created key {name:?} (version 1) in {}",
                key_file.display()
            );
        }
        KeysCmd::List { key_file } => {
            let keyring = Keyring::load(&key_file)?;
            print_json(&keyring.list())?;
        }
        KeysCmd::Rotate { key_file, name } => {
            let mut keyring = Keyring::load(&key_file)?;
            let version = keyring.rotate(&name)?;
            eprintln!(
                "kmsfs: key {name:?} is now at version {version}; new files use it, older versions still unwrap (running mounts pick it up on their next new key use after remount)"
            );
        }
    }
    Ok(())
}
