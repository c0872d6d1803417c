//! KMS test support: the real dev servers (OpenBao, moto) the scripts start,
//! the HTTP(S) mocks of Azure Key Vault and GCP Cloud KMS, and what the
//! provider tests share.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod dev_server;
#[cfg(feature = "gcp")]
pub mod gcp;
pub mod http_mock;
#[cfg(feature = "vault")]
pub mod vault;

use kmsfs::crypto::Dek;
use kmsfs::kms::KmsError;

/// The error of an unwrap that must fail.
pub fn unwrap_err(r: Result<Dek, KmsError>) -> KmsError {
    match r {
        Ok(_) => panic!("unwrap unexpectedly succeeded"),
        Err(e) => e,
    }
}
