//! The GCP Cloud KMS provider against the local HTTP mock of the Cloud KMS
//! REST API in tests/common/kms/gcp.rs. The provider is built exactly as in
//! production, through `GcpKms::connect` with a service-account key file and
//! the `endpoint` override.
#![cfg(feature = "gcp")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::kms::gcp::{b64_decode, Mock, Mode, KEY_ID};
use common::kms::unwrap_err;
use kmsfs::crypto::Dek;
use kmsfs::kms::config::KmsConfig;
use kmsfs::kms::gcp::{GcpConfig, GcpKms};
use kmsfs::kms::{KeyProvider, KeyRef, KmsError, WrapContext};

fn assert_no_secrets(err: &KmsError) {
    let s = err.to_string();
    assert!(
        !s.contains("PRIVATE KEY") && !s.contains("eyJ"),
        "error leaks credentials: {s}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_and_requests_sent() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    assert_eq!(kms.kind(), "gcp");
    let ctx = WrapContext::file_v1([9; 16]);
    let (dek, wrapped) = kms.generate_dek(&ctx).await.unwrap();
    assert_eq!(
        wrapped.key_ref,
        KeyRef {
            provider: "gcp".into(),
            key_id: KEY_ID.into(),
            key_version: "1".into(),
        }
    );
    assert!(kms.handles(&wrapped.key_ref));
    assert!(!kms.handles(&KeyRef {
        provider: "gcp".into(),
        key_id: "projects/test-proj/locations/europe-west1/keyRings/ring/cryptoKeys/other".into(),
        key_version: "1".into(),
    }));
    assert!(!kms.handles(&KeyRef {
        provider: "aws".into(),
        key_id: KEY_ID.into(),
        key_version: "1".into(),
    }));
    let back = kms.unwrap(&wrapped, &ctx).await.unwrap();
    assert_eq!(back.as_bytes(), dek.as_bytes());

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let e = &reqs[0];
    assert_eq!(e.method, "POST");
    assert_eq!(e.path, format!("/v1/{KEY_ID}:encrypt"));
    assert_eq!(
        e.query.get("$alt").map(String::as_str),
        Some("json;enum-encoding=int")
    );
    assert!(e
        .headers
        .get("content-type")
        .unwrap()
        .starts_with("application/json"));
    assert!(e.headers.contains_key("x-goog-api-client"));
    assert!(
        mock.token_ok(e),
        "bearer token is not a JWT signed by the key file"
    );
    let body = e.json();
    assert_eq!(
        b64_decode(body["plaintext"].as_str().unwrap()),
        dek.as_bytes()
    );
    assert_eq!(
        b64_decode(
            body["additionalAuthenticatedData"]
                .as_str()
                .expect("AAD sent")
        ),
        ctx.canonical_bytes()
    );
    assert!(
        body.get("name").is_none(),
        "name belongs in the path: {body}"
    );
    let d = &reqs[1];
    assert_eq!(d.method, "POST");
    assert_eq!(d.path, format!("/v1/{KEY_ID}:decrypt"));
    assert!(mock.token_ok(d));
    let body = d.json();
    assert_eq!(
        b64_decode(body["ciphertext"].as_str().unwrap()),
        wrapped.blob
    );
    assert_eq!(
        b64_decode(
            body["additionalAuthenticatedData"]
                .as_str()
                .expect("AAD sent")
        ),
        ctx.canonical_bytes()
    );

    kms.check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_version_and_rotation() {
    let mock = Mock::start().await;
    let primary = mock.kms(None).await;
    let (d1, w1) = primary
        .generate_dek(&WrapContext::file_v1([1; 16]))
        .await
        .unwrap();
    assert_eq!(w1.key_ref.key_version, "1");
    mock.rotate();
    let pinned = mock.kms(Some("1")).await;
    mock.clear();
    let ctx = WrapContext::file_v1([1; 16]);
    let (d2, w2) = primary.generate_dek(&ctx).await.unwrap();
    assert_eq!(w2.key_ref.key_version, "2");
    let (d3, w3) = pinned.generate_dek(&ctx).await.unwrap();
    assert_eq!(w3.key_ref.key_version, "1");
    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        vec![
            format!("/v1/{KEY_ID}:encrypt"),
            format!("/v1/{KEY_ID}/cryptoKeyVersions/1:encrypt")
        ]
    );
    for (d, w) in [(&d1, &w1), (&d2, &w2), (&d3, &w3)] {
        assert_eq!(
            primary.unwrap(w, &ctx).await.unwrap().as_bytes(),
            d.as_bytes()
        );
        assert_eq!(
            pinned.unwrap(w, &ctx).await.unwrap().as_bytes(),
            d.as_bytes()
        );
    }
    // Decrypt always names the CryptoKey: Cloud KMS finds the version.
    assert!(mock
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(":decrypt"))
        .all(|r| r.path == format!("/v1/{KEY_ID}:decrypt")));
}

// Another file's context and tampered blobs: tests/kms_contract.rs.
#[tokio::test(flavor = "multi_thread")]
async fn another_keys_blob_is_not_sent() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    let ctx = WrapContext::file_v1([1; 16]);
    let mut foreign = kms.wrap(&Dek::generate(), &ctx).await.unwrap();
    foreign.key_ref.key_id = "projects/x/locations/global/keyRings/r/cryptoKeys/k".into();
    mock.clear();
    let err = unwrap_err(kms.unwrap(&foreign, &ctx).await);
    assert!(matches!(err, KmsError::NoProvider { .. }), "{err}");
    assert!(mock.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn service_errors_are_classified() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    let ctx = WrapContext::file_v1([3; 16]);
    let dek = Dek::generate();
    let wrapped = kms.wrap(&dek, &ctx).await.unwrap();

    mock.set_mode(Mode::Reject401);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    assert_no_secrets(&err);

    mock.set_mode(Mode::Deny403);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(
            err,
            KmsError::PermissionDenied {
                operation: "cloudkms.cryptoKeyVersions.useToEncrypt",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("cryptoKeyEncrypterDecrypter"),
        "{err}"
    );
    let err = unwrap_err(kms.unwrap(&wrapped, &ctx).await);
    eprintln!("{err}");
    assert!(
        matches!(
            err,
            KmsError::PermissionDenied {
                operation: "cloudkms.cryptoKeyVersions.useToDecrypt",
                ..
            }
        ),
        "{err}"
    );
    assert_no_secrets(&err);

    mock.set_mode(Mode::Disabled);
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyVersionUnusable { .. }), "{err}");
    assert!(err.to_string().contains("DISABLED"), "{err}");
    let err = unwrap_err(kms.unwrap(&wrapped, &ctx).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyVersionUnusable { .. }), "{err}");

    mock.set_mode(Mode::Normal);
    let mut cfg = mock.cfg(None);
    cfg.key = "missing".into();
    let missing = GcpKms::connect(&cfg).await.unwrap();
    let err = missing.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");
    assert!(err.to_string().contains("cryptoKeys/missing"), "{err}");
    let mut cfg = mock.cfg(Some("7"));
    cfg.key = "kek".into();
    let err = GcpKms::connect(&cfg)
        .await
        .unwrap()
        .wrap(&dek, &ctx)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");

    assert_eq!(
        kms.unwrap(&wrapped, &ctx).await.unwrap().as_bytes(),
        dek.as_bytes()
    );
}

/// The provider as `KmsConfig` connects it: calls bounded by the configured
/// timeout.
async fn bounded(cfg: &GcpConfig) -> Arc<dyn KeyProvider> {
    KmsConfig::Gcp(cfg.clone()).connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_server_times_out_at_the_configured_timeout() {
    // An unreachable one: tests/kms_contract.rs.
    let mock = Mock::start().await;
    let ctx = WrapContext::file_v1([4; 16]);
    let dek = Dek::generate();
    // A server that accepts but never answers: the timeout layer gives up
    // after the configured timeout.
    mock.server.hang();
    let mut cfg = mock.cfg(None);
    cfg.timeout_secs = 1;
    let kms = bounded(&cfg).await;
    let t = std::time::Instant::now();
    let err = kms.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Timeout { seconds: 1, .. }), "{err}");
    assert!(err.is_retryable());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn config_and_credentials_are_validated() {
    let mock = Mock::start().await;
    let base = mock.cfg(None);
    for bad in [
        GcpConfig {
            project: "a/b".into(),
            ..base.clone()
        },
        GcpConfig {
            key: String::new(),
            ..base.clone()
        },
        GcpConfig {
            endpoint: Some("cloudkms.googleapis.com".into()),
            ..base.clone()
        },
        GcpConfig {
            credentials_file: Some(mock.dir.path().join("missing.json")),
            ..base.clone()
        },
    ] {
        let Err(err) = GcpKms::connect(&bad).await else {
            panic!("accepted {bad:?}")
        };
        assert!(matches!(err, KmsError::Config(_)), "{err}");
    }
    // A key file of an unknown type, and one that is not JSON.
    let odd = mock.dir.path().join("odd.json");
    std::fs::write(&odd, r#"{"type":"something_else"}"#).unwrap();
    let Err(err) = GcpKms::connect(&GcpConfig {
        credentials_file: Some(odd.clone()),
        ..base.clone()
    })
    .await
    else {
        panic!("accepted an unknown credentials type")
    };
    assert!(err.to_string().contains("service_account"), "{err}");
    std::fs::write(&odd, "private_key = not json").unwrap();
    let Err(err) = GcpKms::connect(&GcpConfig {
        credentials_file: Some(odd),
        ..base.clone()
    })
    .await
    else {
        panic!("accepted a non-JSON key file")
    };
    assert!(
        !err.to_string().contains("not json"),
        "echoes the file: {err}"
    );
}
