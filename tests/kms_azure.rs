//! The Azure Key Vault provider against the local HTTPS mock of the Key
//! Vault REST API in tests/common/kms/azure.rs, which records every request
//! so these tests can assert what the SDK sends: method, path, api-version,
//! alg, body and Authorization header.
#![cfg(feature = "azure")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use base64::Engine;
use common::kms::azure::{FakeCredential, Mock, Mode, API_VERSION, B64URL, KEY, TOKEN, V1, V2};
use common::kms::unwrap_err;
use kmsfs::crypto::Dek;
use kmsfs::kms::azure::{AzureConfig, AzureKms};
use kmsfs::kms::config::KmsConfig;
use kmsfs::kms::instrumented::Instrumented;
use kmsfs::kms::{KeyProvider, KeyRef, KmsError, WrapContext};
use sha2::{Digest, Sha256};

fn binding(ctx: &WrapContext) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"kmsfs azure wrap v1\0");
    h.update(ctx.canonical_bytes());
    h.finalize().to_vec()
}

fn assert_no_secrets(err: &KmsError) {
    let s = err.to_string();
    assert!(!s.contains(TOKEN), "error leaks the token: {s}");
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_and_requests_sent() {
    let mock = Mock::start().await;
    let (kms, cred) = mock.kms(None);
    assert_eq!(kms.kind(), "azure");
    let ctx = WrapContext::file_v1([7; 16]);
    let (dek, wrapped) = kms.generate_dek(&ctx).await.unwrap();
    let key_id = format!("{}/keys/{KEY}", mock.vault_url());
    assert_eq!(
        wrapped.key_ref,
        KeyRef {
            provider: "azure".into(),
            key_id: key_id.clone(),
            key_version: V1.into(),
        }
    );
    assert_eq!(kms.key_id(), key_id);
    assert!(kms.handles(&wrapped.key_ref));
    assert!(!kms.handles(&KeyRef {
        provider: "azure".into(),
        key_id: format!("{}/keys/other", mock.vault_url()),
        key_version: V1.into(),
    }));
    assert!(!kms.handles(&KeyRef {
        provider: "gcp".into(),
        key_id: key_id.clone(),
        key_version: V1.into(),
    }));
    let back = kms.unwrap(&wrapped, &ctx).await.unwrap();
    assert_eq!(back.as_bytes(), dek.as_bytes());

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    // 1. The SDK's first request carries neither a token nor the DEK: it
    //    only provokes the authentication challenge.
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, format!("/keys/{KEY}//wrapkey"));
    assert!(reqs[0].header("authorization").is_none());
    assert!(reqs[0].body.is_empty(), "DEK sent before authentication");
    // 2. wrapKey with the token, latest version (empty path segment).
    let w = &reqs[1];
    assert_eq!(w.method, "POST");
    assert_eq!(w.path, format!("/keys/{KEY}//wrapkey"));
    assert_eq!(
        w.query.get("api-version").map(String::as_str),
        Some(API_VERSION)
    );
    assert_eq!(
        w.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert!(w
        .headers
        .get("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = w.json();
    assert_eq!(body["alg"], "RSA-OAEP-256");
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "unexpected fields: {body}"
    );
    let plain = B64URL.decode(body["value"].as_str().unwrap()).unwrap();
    assert_eq!(plain.len(), 64);
    assert_eq!(&plain[..32], dek.as_bytes());
    assert_eq!(&plain[32..], &binding(&ctx)[..], "context binding");
    // 3. unwrapKey names the version the wrap reported.
    let u = &reqs[2];
    assert_eq!(u.method, "POST");
    assert_eq!(u.path, format!("/keys/{KEY}/{V1}/unwrapkey"));
    assert_eq!(
        u.query.get("api-version").map(String::as_str),
        Some(API_VERSION)
    );
    assert_eq!(
        u.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let body = u.json();
    assert_eq!(body["alg"], "RSA-OAEP-256");
    assert_eq!(
        B64URL.decode(body["value"].as_str().unwrap()).unwrap(),
        wrapped.blob
    );
    // The token was asked for the scope from the vault's challenge.
    let scopes = cred.scopes.lock().unwrap().clone();
    assert!(!scopes.is_empty());
    assert!(
        scopes
            .iter()
            .all(|s| s == "https://vault.localhost/.default"),
        "{scopes:?}"
    );

    // check() is a round trip too.
    kms.check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_version_and_rotation() {
    let mock = Mock::start().await;
    let (pinned, _) = mock.kms(Some(V1));
    let (latest, _) = mock.kms(None);
    let ctx = WrapContext::file_v1([1; 16]);
    let (d1, w1) = latest.generate_dek(&ctx).await.unwrap();
    assert_eq!(w1.key_ref.key_version, V1);
    mock.rotate();
    mock.clear();
    let (d2, w2) = latest.generate_dek(&ctx).await.unwrap();
    assert_eq!(w2.key_ref.key_version, V2);
    let (d3, w3) = pinned.generate_dek(&ctx).await.unwrap();
    assert_eq!(w3.key_ref.key_version, V1);
    let paths: Vec<String> = mock
        .requests()
        .iter()
        .filter(|r| r.header("authorization").is_some())
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        vec![
            format!("/keys/{KEY}//wrapkey"),
            format!("/keys/{KEY}/{V1}/wrapkey")
        ]
    );
    // Every version still unwraps, through either provider.
    for (d, w) in [(&d1, &w1), (&d2, &w2), (&d3, &w3)] {
        assert_eq!(
            latest.unwrap(w, &ctx).await.unwrap().as_bytes(),
            d.as_bytes()
        );
        assert_eq!(
            pinned.unwrap(w, &ctx).await.unwrap().as_bytes(),
            d.as_bytes()
        );
    }
    assert!(latest.describe().contains("latest"));
    assert!(pinned.describe().contains(V1));
}

#[tokio::test(flavor = "multi_thread")]
async fn context_mismatch_unknown_version_and_foreign_keys() {
    let mock = Mock::start().await;
    let (kms, _) = mock.kms(None);
    let ctx = WrapContext::file_v1([1; 16]);
    let dek = Dek::generate();
    let wrapped = kms.wrap(&dek, &ctx).await.unwrap();
    // The sidecar moved to another file: Key Vault unwraps, kmsfs refuses.
    let other = WrapContext::file_v1([2; 16]);
    let err = unwrap_err(kms.unwrap(&wrapped, &other).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
    assert!(err.to_string().contains("another file"), "{err}");
    assert!(!err.is_retryable());
    // A tampered blob: tests/kms_contract.rs.
    // A blob naming an unknown version: 404 -> KeyNotFound.
    let mut unknown = wrapped.clone();
    unknown.key_ref.key_version = "00000000000000000000000000000000".into();
    let err = unwrap_err(kms.unwrap(&unknown, &ctx).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");
    // A key reference from another vault is not ours.
    let mut foreign = wrapped.clone();
    foreign.key_ref.key_id = "https://other.vault.azure.net/keys/kek".into();
    let err = unwrap_err(kms.unwrap(&foreign, &ctx).await);
    assert!(matches!(err, KmsError::NoProvider { .. }), "{err}");
    // The right context still works.
    assert_eq!(
        kms.unwrap(&wrapped, &ctx).await.unwrap().as_bytes(),
        dek.as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn service_errors_are_classified() {
    let mock = Mock::start().await;
    let (kms, _) = mock.kms(None);
    let ctx = WrapContext::file_v1([3; 16]);
    let dek = Dek::generate();
    let wrapped = kms.wrap(&dek, &ctx).await.unwrap();

    mock.set_mode(Mode::Reject401);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    assert_no_secrets(&err);
    assert!(!err.is_retryable());

    mock.set_mode(Mode::Deny403);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(
            err,
            KmsError::PermissionDenied {
                operation: "wrapKey",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("keys/wrapKey"), "{err}");
    let err = unwrap_err(kms.unwrap(&wrapped, &ctx).await);
    assert!(
        matches!(
            err,
            KmsError::PermissionDenied {
                operation: "unwrapKey",
                ..
            }
        ),
        "{err}"
    );
    assert_no_secrets(&err);

    mock.set_mode(Mode::Disabled403);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyVersionUnusable { .. }), "{err}");
    assert!(err.to_string().contains("disabled"), "{err}");

    mock.set_mode(Mode::Normal);
    let mut cfg = mock.cfg(None, 10);
    cfg.key_name = "missing".into();
    let missing = mock.kms_with(&cfg, mock.addr(), Arc::new(FakeCredential::default()));
    let err = missing.wrap(&dek, &ctx).await.unwrap_err();
    match &err {
        KmsError::KeyNotFound { key, .. } => {
            assert_eq!(key, &format!("{}/keys/missing", mock.vault_url()))
        }
        other => panic!("expected KeyNotFound, got {other}"),
    }
    // And the provider still works once the vault is back to normal.
    assert_eq!(
        kms.unwrap(&wrapped, &ctx).await.unwrap().as_bytes(),
        dek.as_bytes()
    );
}

/// `kms` behind the timeout layer, bounded by what `cfg` configures (what
/// `KmsConfig::build` does, here with the mock's HTTP client).
fn bounded(cfg: &AzureConfig, kms: AzureKms) -> Arc<dyn KeyProvider> {
    Instrumented::bounded(Arc::new(kms), KmsConfig::Azure(cfg.clone()).timeout())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_vault_times_out_at_the_configured_timeout() {
    // An unreachable one: tests/kms_contract.rs.
    let mock = Mock::start().await;
    let ctx = WrapContext::file_v1([4; 16]);
    let dek = Dek::generate();
    // A vault that accepts but never answers: the timeout layer gives up
    // after the configured timeout.
    mock.server.hang();
    let cfg = mock.cfg(None, 1);
    let kms = bounded(
        &cfg,
        mock.kms_with(&cfg, mock.addr(), Arc::new(FakeCredential::default())),
    );
    let t = std::time::Instant::now();
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Timeout { seconds: 1, .. }), "{err}");
    assert!(err.is_retryable());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn config_is_validated() {
    let cred: Arc<dyn TokenCredential> = Arc::new(FakeCredential::default());
    let base = AzureConfig {
        vault_url: "https://myvault.vault.azure.net/".into(),
        key_name: "kek".into(),
        key_version: Some(String::new()),
        timeout_secs: 10,
    };
    // Trailing slash and empty version are normalised.
    let kms = AzureKms::with_credential(&base, cred.clone(), None).unwrap();
    assert_eq!(kms.key_id(), "https://myvault.vault.azure.net/keys/kek");
    assert!(kms.describe().contains("latest"));
    for bad in [
        AzureConfig {
            vault_url: "http://myvault.vault.azure.net".into(),
            ..base.clone()
        },
        AzureConfig {
            vault_url: "https://myvault.vault.azure.net/keys/kek".into(),
            ..base.clone()
        },
        AzureConfig {
            key_name: "a/b".into(),
            ..base.clone()
        },
        AzureConfig {
            key_version: Some("../x".into()),
            ..base.clone()
        },
    ] {
        let Err(err) = AzureKms::with_credential(&bad, cred.clone(), None) else {
            panic!("accepted {bad:?}")
        };
        assert!(matches!(err, KmsError::Config(_)), "{err}");
    }
}
