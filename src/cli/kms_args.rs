//! The flags that say how new files are protected (`init`, `policy set`):
//! either `--kms` with its provider's flags (each provider's flags form one
//! group), which define a provider in the trusted configuration or reuse
//! one defined alike, or `--provider NAME --key ID`, which name a key of a
//! provider already there. [`KmsArgs::to_key`] is the one translation.
//!
//! Every provider's flags exist in every build, so that naming a provider
//! compiled out gives "not available in this build", not "unknown flag".

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};

use kmsfs::config::{trusted, KeySpec, KmsConfig};
use kmsfs::format::CipherSuite;
use kmsfs::kms::local::Keyring;

use super::{absolute, trust};

/// The `--cipher` of new files unless one is given.
pub const DEFAULT_CIPHER: CipherSuite = CipherSuite::Aes256Gcm;

/// Parses `--cipher`: the name of any suite the header format knows. The
/// format's suite ids are the one list of suites, so they are enumerated
/// rather than listed again here.
pub fn cipher_suite() -> impl TypedValueParser<Value = CipherSuite> {
    let names = (0..=u8::MAX)
        .filter_map(|id| CipherSuite::from_id(id).ok())
        .map(CipherSuite::name);
    PossibleValuesParser::new(names).map(|name| name.parse().expect("a suite's own name parses"))
}

/// `--kms`: which provider holds the key.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum KmsProvider {
    Local,
    Vault,
    Aws,
    Azure,
    Gcp,
}

impl KmsProvider {
    /// The name `--kms` takes.
    fn name(self) -> String {
        self.to_possible_value()
            .expect("no provider is hidden")
            .get_name()
            .to_owned()
    }
}

/// Flags that name the KMS key protecting new files. Flatten it after a
/// command's other flags: each provider's group sets the help heading of
/// whatever flags follow it.
#[derive(Args, Clone)]
pub struct KmsArgs {
    /// KMS of the key that wraps new files' DEKs; its flags below define
    /// (or find) a provider in the trusted configuration.
    #[arg(long, value_enum)]
    kms: Option<KmsProvider>,
    /// Name of the provider in the trusted configuration: with --kms, the
    /// name to give it (default: its type, numbered if taken); without, an
    /// existing provider to use (with --key).
    #[arg(long, value_name = "NAME")]
    provider: Option<String>,
    /// Without --kms: the key's ID in --provider.
    #[arg(long, value_name = "ID", requires = "provider", conflicts_with = "kms")]
    key: Option<String>,
    /// Without --kms: pin the key's version (Azure, GCP).
    #[arg(long, value_name = "VERSION", requires = "key")]
    key_version: Option<String>,
    #[command(flatten)]
    local: LocalArgs,
    #[command(flatten)]
    vault: VaultArgs,
    #[command(flatten)]
    aws: AwsArgs,
    #[command(flatten)]
    azure: AzureArgs,
    #[command(flatten)]
    gcp: GcpArgs,
}

impl KmsArgs {
    /// The key the flags name, as a volume records it. With `--kms`, the
    /// provider its flags describe is found in, or added to, the trusted
    /// configuration (`backing` is where the volume is, for checks).
    pub fn to_key(&self, backing: &Path) -> Result<KeySpec> {
        let Some(kms) = self.kms else {
            return match (&self.provider, &self.key) {
                (Some(provider), Some(id)) => {
                    let key = KeySpec {
                        provider: provider.clone(),
                        id: id.clone(),
                        version: self.key_version.clone(),
                    };
                    trust::load()?.resolve(&key)?;
                    Ok(key)
                }
                _ => bail!(
                    "name the key: --kms local|vault|aws|azure|gcp with its flags, or --provider NAME --key ID for a provider of the trusted configuration ({})",
                    trust::path().display()
                ),
            };
        };
        let (def, key) = self.to_config(kms, backing)?.split("");
        let path = trust::path();
        let (name, added) =
            trusted::update(&path, |t| t.find_or_add(def, self.provider.as_deref()))?;
        if added {
            eprintln!(
                "kmsfs: added provider {name:?} ({}) to the trusted configuration {}",
                kms.name(),
                path.display()
            );
        }
        Ok(KeySpec {
            provider: name,
            ..key
        })
    }

    /// The configuration `--kms` and its provider's flags describe. For the
    /// local provider, the keyring and key are created if missing; the
    /// keyring must lie outside `backing`.
    fn to_config(&self, kms: KmsProvider, backing: &Path) -> Result<KmsConfig> {
        match kms {
            KmsProvider::Local => self.local.to_config(backing),
            #[cfg(feature = "vault")]
            KmsProvider::Vault => Ok(KmsConfig::Vault(self.vault.to_config()?)),
            #[cfg(feature = "aws")]
            KmsProvider::Aws => Ok(KmsConfig::Aws(self.aws.to_config()?)),
            #[cfg(feature = "azure")]
            KmsProvider::Azure => Ok(KmsConfig::Azure(self.azure.to_config()?)),
            #[cfg(feature = "gcp")]
            KmsProvider::Gcp => Ok(KmsConfig::Gcp(self.gcp.to_config()?)),
            #[cfg(not(feature = "vault"))]
            KmsProvider::Vault => Err(not_in_this_build(kms)),
            #[cfg(not(feature = "aws"))]
            KmsProvider::Aws => Err(not_in_this_build(kms)),
            #[cfg(not(feature = "azure"))]
            KmsProvider::Azure => Err(not_in_this_build(kms)),
            #[cfg(not(feature = "gcp"))]
            KmsProvider::Gcp => Err(not_in_this_build(kms)),
        }
    }
}

#[cfg_attr(
    all(feature = "vault", feature = "aws", feature = "azure", feature = "gcp"),
    allow(dead_code)
)]
fn not_in_this_build(kms: KmsProvider) -> anyhow::Error {
    anyhow!(
        "KMS {:?} is not available in this build (compiled without its cargo feature)",
        kms.name()
    )
}

/// Whether the operator typed a plain http:// URL: that is the explicit
/// permission the trusted configuration then records (`allow_http`); a
/// volume can never grant it.
#[cfg_attr(
    not(any(feature = "vault", feature = "aws", feature = "gcp")),
    allow(dead_code)
)]
fn typed_http(url: Option<&str>) -> bool {
    let http = url.is_some_and(|u| u.trim().to_ascii_lowercase().starts_with("http://"));
    if http {
        eprintln!(
            "kmsfs: warning: {} is plain http; recording allow_http = true for this provider in the trusted configuration",
            url.unwrap_or_default()
        );
    }
    http
}

/// A flag the chosen provider cannot do without.
#[cfg_attr(
    not(any(feature = "vault", feature = "aws", feature = "azure", feature = "gcp")),
    allow(dead_code)
)]
fn need(value: &Option<String>, flag: &str, kms: KmsProvider) -> Result<String> {
    value
        .clone()
        .ok_or_else(|| anyhow!("--kms {} needs {flag}", kms.name()))
}

#[derive(Args, Clone)]
#[command(next_help_heading = "Local keyring (--kms local)")]
struct LocalArgs {
    /// Keyring file (outside the backing directory); created if missing.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Key name within the keyring.
    #[arg(long, default_value = "default")]
    key_name: String,
}

impl LocalArgs {
    fn to_config(&self, backing: &Path) -> Result<KmsConfig> {
        let key_file = self.key_file.as_deref().ok_or_else(|| {
            anyhow!("--kms local needs --key-file FILE (a keyring outside the backing directory)")
        })?;
        let key_file = absolute(key_file)?;
        // Compared with symlinks and `..` resolved, as far as both exist.
        let resolved = |p: &Path| {
            p.ancestors()
                .find_map(|a| {
                    a.canonicalize()
                        .ok()
                        .map(|c| c.join(p.strip_prefix(a).unwrap()))
                })
                .unwrap_or_else(|| p.to_owned())
        };
        if key_file.starts_with(backing) || resolved(&key_file).starts_with(resolved(backing)) {
            bail!(
                "the key file {} is inside the backing directory {}; keep keys away from the ciphertext",
                key_file.display(),
                backing.display()
            );
        }
        ensure_local_key(&key_file, &self.key_name)?;
        Ok(KmsConfig::Local {
            key_file,
            key: self.key_name.clone(),
        })
    }
}

/// Opens the local keyring, creating it if missing, and makes sure it holds
/// key `name`.
fn ensure_local_key(key_file: &Path, name: &str) -> Result<()> {
    let mut keyring = if key_file.exists() {
        Keyring::load(key_file)?
    } else {
        let keyring = Keyring::create_empty(key_file)?;
        eprintln!("kmsfs: created keyring {} (mode 0600) — back it up: without it your files are unreadable", key_file.display());
        keyring
    };
    if !keyring.has_key(name) {
        keyring.create_key(name)?;
        eprintln!("kmsfs: created key {name:?} in {}", key_file.display());
    }
    Ok(())
}

/// `--vault-auth`: how kmsfs logs in to Vault.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum VaultAuthMethod {
    Token,
    Approle,
    Kubernetes,
}

#[derive(Args, Clone)]
#[command(next_help_heading = "Vault / OpenBao transit (--kms vault)")]
struct VaultArgs {
    /// Server address, e.g. http://127.0.0.1:8200 (token from
    /// VAULT_TOKEN). Without it, none is recorded: VAULT_ADDR is read at
    /// every use.
    #[arg(long)]
    vault_addr: Option<String>,
    /// Transit key name.
    #[arg(long)]
    vault_key: Option<String>,
    /// Transit mount path.
    #[arg(long, default_value = "transit")]
    vault_mount: String,
    /// Enterprise namespace.
    #[arg(long)]
    vault_namespace: Option<String>,
    /// Auth method.
    #[arg(long, value_enum, default_value_t = VaultAuthMethod::Token)]
    vault_auth: VaultAuthMethod,
    /// approle: role ID (secret ID from --vault-secret-id-file or VAULT_SECRET_ID).
    #[arg(long)]
    vault_role_id: Option<String>,
    /// approle: file holding the secret ID.
    #[arg(long)]
    vault_secret_id_file: Option<PathBuf>,
    /// kubernetes: role name.
    #[arg(long)]
    vault_k8s_role: Option<String>,
    /// kubernetes: service-account JWT file.
    #[arg(long)]
    vault_k8s_jwt_file: Option<PathBuf>,
    /// Auth mount path (default: approle / kubernetes).
    #[arg(long)]
    vault_auth_mount: Option<String>,
    /// CA certificate to verify the server with (PEM).
    #[arg(long)]
    vault_ca_cert: Option<PathBuf>,
    /// Client certificate for TLS client authentication (PEM).
    #[arg(long)]
    vault_client_cert: Option<PathBuf>,
    /// Private key of --vault-client-cert (PEM).
    #[arg(long)]
    vault_client_key: Option<PathBuf>,
    /// Do not verify the server's TLS certificate (tests only).
    #[arg(long)]
    vault_skip_verify: bool,
}

#[cfg(feature = "vault")]
impl VaultArgs {
    fn to_config(&self) -> Result<kmsfs::kms::vault::VaultConfig> {
        use kmsfs::kms::vault::{VaultAuth, VaultConfig};
        let vault = KmsProvider::Vault;
        let absolute_opt = |p: &Option<PathBuf>| p.as_deref().map(absolute).transpose();
        let auth = match self.vault_auth {
            VaultAuthMethod::Token => VaultAuth::Token,
            VaultAuthMethod::Approle => VaultAuth::Approle {
                role_id: need(&self.vault_role_id, "--vault-role-id", vault)?,
                secret_id_file: absolute_opt(&self.vault_secret_id_file)?,
                mount: self
                    .vault_auth_mount
                    .clone()
                    .unwrap_or_else(|| "approle".into()),
            },
            VaultAuthMethod::Kubernetes => VaultAuth::Kubernetes {
                role: need(&self.vault_k8s_role, "--vault-k8s-role", vault)?,
                jwt_file: self.vault_k8s_jwt_file.clone().unwrap_or_else(|| {
                    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
                }),
                mount: self
                    .vault_auth_mount
                    .clone()
                    .unwrap_or_else(|| "kubernetes".into()),
            },
        };
        // Without --vault-addr the provider reads VAULT_ADDR whenever it
        // connects; it must be set now too, for the checks that follow.
        let env_addr = std::env::var("VAULT_ADDR")
            .ok()
            .filter(|a| !a.trim().is_empty());
        if self.vault_addr.is_none() && env_addr.is_none() {
            bail!("--kms vault needs --vault-addr URL, or VAULT_ADDR in the environment");
        }
        Ok(VaultConfig {
            address: self.vault_addr.clone().unwrap_or_default(),
            mount: self.vault_mount.clone(),
            key: need(&self.vault_key, "--vault-key NAME", vault)?,
            namespace: self.vault_namespace.clone(),
            auth,
            ca_cert: absolute_opt(&self.vault_ca_cert)?,
            client_cert: absolute_opt(&self.vault_client_cert)?,
            client_key: absolute_opt(&self.vault_client_key)?,
            skip_verify: self.vault_skip_verify,
            allow_http: typed_http(self.vault_addr.as_deref().or(env_addr.as_deref())),
            timeout_secs: kmsfs::kms::default_timeout_secs(),
        })
    }
}

#[derive(Args, Clone)]
#[command(next_help_heading = "AWS KMS (--kms aws)")]
struct AwsArgs {
    /// Key ID, key ARN or alias (alias/NAME).
    #[arg(long)]
    aws_key_id: Option<String>,
    /// Region (default: AWS_REGION or the profile's region).
    #[arg(long)]
    aws_region: Option<String>,
    /// Custom endpoint (LocalStack, moto).
    #[arg(long)]
    aws_endpoint: Option<String>,
    /// Named profile from the shared AWS config files.
    #[arg(long)]
    aws_profile: Option<String>,
    /// Role ARN to assume.
    #[arg(long)]
    aws_assume_role: Option<String>,
    /// External ID to present when assuming --aws-assume-role.
    #[arg(long)]
    aws_external_id: Option<String>,
}

#[cfg(feature = "aws")]
impl AwsArgs {
    fn to_config(&self) -> Result<kmsfs::kms::aws::AwsConfig> {
        Ok(kmsfs::kms::aws::AwsConfig {
            key_id: need(&self.aws_key_id, "--aws-key-id ID", KmsProvider::Aws)?,
            region: self.aws_region.clone(),
            endpoint: self.aws_endpoint.clone(),
            allow_http: typed_http(self.aws_endpoint.as_deref()),
            profile: self.aws_profile.clone(),
            assume_role_arn: self.aws_assume_role.clone(),
            external_id: self.aws_external_id.clone(),
            // Filled in from a typed ARN when the provider is recorded.
            account: None,
            timeout_secs: kmsfs::kms::default_timeout_secs(),
        })
    }
}

#[derive(Args, Clone)]
#[command(next_help_heading = "Azure Key Vault (--kms azure)")]
struct AzureArgs {
    /// Vault URL, e.g. https://NAME.vault.azure.net
    #[arg(long)]
    azure_vault_url: Option<String>,
    /// Key name.
    #[arg(long)]
    azure_key: Option<String>,
    /// Key version (default: latest).
    #[arg(long)]
    azure_key_version: Option<String>,
}

#[cfg(feature = "azure")]
impl AzureArgs {
    fn to_config(&self) -> Result<kmsfs::kms::azure::AzureConfig> {
        let azure = KmsProvider::Azure;
        Ok(kmsfs::kms::azure::AzureConfig {
            vault_url: need(&self.azure_vault_url, "--azure-vault-url URL", azure)?,
            key_name: need(&self.azure_key, "--azure-key NAME", azure)?,
            key_version: self.azure_key_version.clone().filter(|v| !v.is_empty()),
            timeout_secs: kmsfs::kms::default_timeout_secs(),
        })
    }
}

#[derive(Args, Clone)]
#[command(next_help_heading = "GCP Cloud KMS (--kms gcp)")]
struct GcpArgs {
    /// Project ID.
    #[arg(long)]
    gcp_project: Option<String>,
    /// Location of the key ring, e.g. global or europe-west1.
    #[arg(long)]
    gcp_location: Option<String>,
    /// Key ring name.
    #[arg(long)]
    gcp_key_ring: Option<String>,
    /// Key name.
    #[arg(long)]
    gcp_key: Option<String>,
    /// Key version that encrypts (default: the primary version).
    #[arg(long)]
    gcp_key_version: Option<String>,
    /// Service-account key file (default: application default credentials).
    #[arg(long)]
    gcp_credentials_file: Option<PathBuf>,
    /// Custom endpoint (tests).
    #[arg(long)]
    gcp_endpoint: Option<String>,
}

#[cfg(feature = "gcp")]
impl GcpArgs {
    fn to_config(&self) -> Result<kmsfs::kms::gcp::GcpConfig> {
        let gcp = KmsProvider::Gcp;
        Ok(kmsfs::kms::gcp::GcpConfig {
            project: need(&self.gcp_project, "--gcp-project ID", gcp)?,
            location: need(&self.gcp_location, "--gcp-location LOC", gcp)?,
            key_ring: need(&self.gcp_key_ring, "--gcp-key-ring NAME", gcp)?,
            key: need(&self.gcp_key, "--gcp-key NAME", gcp)?,
            key_version: self.gcp_key_version.clone(),
            credentials_file: self
                .gcp_credentials_file
                .as_deref()
                .map(absolute)
                .transpose()?,
            endpoint: self.gcp_endpoint.clone(),
            allow_http: typed_http(self.gcp_endpoint.as_deref()),
            timeout_secs: kmsfs::kms::default_timeout_secs(),
        })
    }
}
