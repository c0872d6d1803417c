//! The AWS KMS provider against a real moto server (scripts/dev-moto.sh).
//! These tests fail, never skip, when moto cannot be installed or started.
#![cfg(feature = "aws")]

mod common;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::kms::aws::{config_at, setup_env, Moto, REGION};
use common::kms::{assert_denied, fails_fast};
use common::Places;
use kmsfs::kms::aws::AwsConfig;
use kmsfs::kms::config::{ConnectError, KmsConfig};
use kmsfs::kms::{KeyProvider, KeyVersions, KmsError, KmsRuntime, WrapContext};

/// The provider as a mount or the CLI connects it: connecting and each call
/// bounded by the configured timeout.
fn connect(rt: &KmsRuntime, cfg: &AwsConfig) -> Result<Arc<dyn KeyProvider>, KmsError> {
    KmsConfig::Aws(cfg.clone()).build(rt).map_err(|e| match e {
        ConnectError::Kms(e) => e,
        other => panic!("not a KMS error: {other}"),
    })
}

fn ctx(n: u8) -> WrapContext {
    WrapContext::file_v1([n; 16])
}

#[test]
fn generate_unwrap_round_trip_and_context_binding() {
    let moto = Moto::start();
    let rt = KmsRuntime::new().unwrap();
    let kms = connect(&rt, &moto.config(moto.key_id())).unwrap();
    assert_eq!(kms.kind(), "aws");
    rt.block_on(kms.check()).unwrap();

    let (dek, wrapped) = rt.block_on(kms.generate_dek(&ctx(1))).unwrap();
    assert_eq!(wrapped.key_ref.provider, "aws");
    assert_eq!(wrapped.key_ref.key_id, moto.key_arn());
    assert_eq!(wrapped.key_ref.key_version, "");
    assert!(kms.handles(&wrapped.key_ref));
    let mut other_ref = wrapped.key_ref.clone();
    other_ref.key_id = other_ref.key_id.replace("key/", "key/0");
    assert!(!kms.handles(&other_ref));
    assert!(
        !wrapped.blob.windows(32).any(|w| w == dek.as_bytes()),
        "wrapped DEK contains the plaintext"
    );

    let back = rt.block_on(kms.unwrap(&wrapped, &ctx(1))).unwrap();
    assert_eq!(back.as_bytes(), dek.as_bytes());

    // Two DEKs differ.
    let (dek2, _) = rt.block_on(kms.generate_dek(&ctx(1))).unwrap();
    assert_ne!(dek2.as_bytes(), dek.as_bytes());

    // Another file's context: the EncryptionContext does not match.
    let err = rt
        .block_on(kms.unwrap(&wrapped, &ctx(2)))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
    assert!(!err.is_retryable());

    // Tampered ciphertext.
    let mut bad = wrapped.clone();
    let last = bad.blob.len() - 1;
    bad.blob[last] ^= 1;
    let err = rt
        .block_on(kms.unwrap(&bad, &ctx(1)))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");

    // Encrypt-based wrap of an existing DEK.
    let w = rt.block_on(kms.wrap(&dek, &ctx(3))).unwrap();
    assert_eq!(w.key_ref, wrapped.key_ref);
    assert_eq!(
        rt.block_on(kms.unwrap(&w, &ctx(3))).unwrap().as_bytes(),
        dek.as_bytes()
    );
    let err = rt
        .block_on(kms.unwrap(&w, &ctx(1)))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
}

#[test]
fn alias_and_arn_name_the_same_key() {
    let moto = Moto::start();
    let rt = KmsRuntime::new().unwrap();
    let by_alias = connect(&rt, &moto.config(moto.alias())).unwrap();
    let by_arn = connect(&rt, &moto.config(moto.key_arn())).unwrap();
    let alias_arn = format!("arn:aws:kms:{REGION}:123456789012:{}", moto.alias());
    let by_alias_arn = connect(&rt, &moto.config(&alias_arn)).unwrap();
    let (dek, wrapped) = rt.block_on(by_alias.generate_dek(&ctx(7))).unwrap();
    assert_eq!(
        wrapped.key_ref.key_id,
        moto.key_arn(),
        "key refs record the key ARN, not the alias"
    );
    assert!(by_arn.handles(&wrapped.key_ref));
    assert!(by_alias_arn.handles(&wrapped.key_ref));
    assert_eq!(
        rt.block_on(by_arn.unwrap(&wrapped, &ctx(7)))
            .unwrap()
            .as_bytes(),
        dek.as_bytes()
    );
    let (_, w2) = rt.block_on(by_arn.generate_dek(&ctx(8))).unwrap();
    rt.block_on(by_alias.unwrap(&w2, &ctx(8))).unwrap();
    rt.block_on(by_alias_arn.check()).unwrap();
}

#[test]
fn unknown_key_is_key_not_found() {
    let moto = Moto::start();
    let rt = KmsRuntime::new().unwrap();
    for key in [
        "alias/no-such-alias".to_owned(),
        "11111111-2222-3333-4444-555555555555".to_owned(),
        format!("arn:aws:kms:{REGION}:123456789012:key/11111111-2222-3333-4444-555555555555"),
    ] {
        let err = connect(&rt, &moto.config(&key))
            .err()
            .expect("unknown key connected");
        assert!(matches!(err, KmsError::KeyNotFound { .. }), "{key}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(REGION),
            "message should name the region: {msg}"
        );
        assert!(!err.is_retryable());
    }
}

#[test]
fn disabled_key_is_unusable() {
    // moto reports a disabled key through DescribeKey (what check() reads)
    // but still serves GenerateDataKey/Decrypt with it; the DisabledException
    // mapping of those calls is covered by `service_errors_are_classified`.
    let moto = Moto::start();
    let rt = KmsRuntime::new().unwrap();
    let admin = rt.block_on(moto.admin());
    let meta = rt
        .block_on(
            admin
                .create_key()
                .description("kmsfs test: to be disabled")
                .send(),
        )
        .unwrap()
        .key_metadata
        .unwrap();
    let key_id = meta.key_id().to_owned();
    let kms = connect(&rt, &moto.config(&key_id)).unwrap();
    rt.block_on(kms.check()).unwrap();
    let (dek, wrapped) = rt.block_on(kms.generate_dek(&ctx(4))).unwrap();
    rt.block_on(admin.disable_key().key_id(&key_id).send())
        .unwrap();

    let err = rt.block_on(kms.check()).unwrap_err();
    assert!(
        matches!(err, KmsError::KeyVersionUnusable { .. }),
        "check: {err}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("not enabled"), "{err}");
    // A disabled key still resolves at connect (DescribeKey works on it).
    let again = connect(&rt, &moto.config(&key_id)).unwrap();
    assert!(again.handles(&wrapped.key_ref));

    rt.block_on(admin.enable_key().key_id(&key_id).send())
        .unwrap();
    rt.block_on(kms.check()).unwrap();
    assert_eq!(
        rt.block_on(kms.unwrap(&wrapped, &ctx(4)))
            .unwrap()
            .as_bytes(),
        dek.as_bytes()
    );

    // A key pending deletion is not usable either.
    rt.block_on(
        admin
            .schedule_key_deletion()
            .key_id(&key_id)
            .pending_window_in_days(7)
            .send(),
    )
    .unwrap();
    let err = rt.block_on(kms.check()).unwrap_err();
    assert!(
        matches!(err, KmsError::KeyVersionUnusable { .. }),
        "check: {err}"
    );
}

/// A minimal AWS JSON-protocol server on loopback: DescribeKey succeeds,
/// an operation with answers queued (`script`) takes the next one, every
/// other operation answers with the error currently set. It records each
/// request's operation and body.
struct StubKms {
    url: String,
    answer: Arc<std::sync::Mutex<(u16, String, String)>>,
    scripted: Arc<std::sync::Mutex<HashMap<String, VecDeque<String>>>>,
    seen: Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
}

const STUB_ARN: &str =
    "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000001";

impl StubKms {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let answer = Arc::new(std::sync::Mutex::new((
            400u16,
            String::new(),
            String::new(),
        )));
        let scripted = Arc::new(std::sync::Mutex::new(
            HashMap::<String, VecDeque<String>>::new(),
        ));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = answer.clone();
        let (sc, sn) = (scripted.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (a, sc, sn) = (a.clone(), sc.clone(), sn.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    loop {
                        let (mut len, mut target) = (0usize, String::new());
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let l = line.trim_end();
                            if l.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = l.split_once(':') {
                                match k.trim().to_ascii_lowercase().as_str() {
                                    "content-length" => len = v.trim().parse().unwrap_or(0),
                                    "x-amz-target" => target = v.trim().to_owned(),
                                    _ => {}
                                }
                            }
                        }
                        let mut body = vec![0u8; len];
                        if r.read_exact(&mut body).is_err() {
                            return;
                        }
                        let op = target.rsplit('.').next().unwrap_or_default().to_owned();
                        sn.lock().unwrap().push((
                            op.clone(),
                            serde_json::from_slice(&body).unwrap_or_default(),
                        ));
                        let queued = sc
                            .lock()
                            .unwrap()
                            .get_mut(&op)
                            .and_then(VecDeque::pop_front);
                        let (status, text) = if let Some(text) = queued {
                            (200, text)
                        } else if target.ends_with(".DescribeKey") {
                            (
                                200,
                                format!(
                                    r#"{{"KeyMetadata":{{"KeyId":"00000000-0000-0000-0000-000000000001","Arn":"{STUB_ARN}","Enabled":true,"KeyState":"Enabled","KeyUsage":"ENCRYPT_DECRYPT"}}}}"#
                                ),
                            )
                        } else {
                            let g = a.lock().unwrap();
                            (
                                g.0,
                                format!(r#"{{"__type":"{}","message":"{}"}}"#, g.1, g.2),
                            )
                        };
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{text}",
                            text.len()
                        );
                        if w.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        StubKms {
            url,
            answer,
            scripted,
            seen,
        }
    }

    fn set(&self, status: u16, code: &str, message: &str) {
        *self.answer.lock().unwrap() = (status, code.to_owned(), message.to_owned());
    }

    /// Queues successful answers (JSON bodies) to operation `op`.
    fn script(&self, op: &str, answers: &[serde_json::Value]) {
        self.scripted
            .lock()
            .unwrap()
            .entry(op.to_owned())
            .or_default()
            .extend(answers.iter().map(|a| a.to_string()));
    }

    /// The bodies of the requests to operation `op` so far.
    fn bodies(&self, op: &str) -> Vec<serde_json::Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

#[test]
fn service_errors_are_classified() {
    setup_env();
    let stub = StubKms::start();
    let rt = KmsRuntime::new().unwrap();
    let cfg = config_at(&stub.url, "alias/stub");
    let kms = connect(&rt, &cfg).unwrap();
    let wrapped = kmsfs::kms::WrappedDek {
        key_ref: kmsfs::kms::KeyRef {
            provider: "aws".into(),
            key_id: STUB_ARN.into(),
            key_version: String::new(),
        },
        blob: vec![7; 64],
    };
    assert!(kms.handles(&wrapped.key_ref));
    let gen = |kms: &Arc<dyn KeyProvider>| {
        rt.block_on(kms.generate_dek(&ctx(1)))
            .map(|_| ())
            .unwrap_err()
    };
    let dec = |kms: &Arc<dyn KeyProvider>| {
        rt.block_on(kms.unwrap(&wrapped, &ctx(1)))
            .map(|_| ())
            .unwrap_err()
    };

    for code in [
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
    ] {
        stub.set(
            400,
            code,
            "The security token included in the request is invalid.",
        );
        let e = gen(&kms);
        assert!(matches!(e, KmsError::AuthFailed { .. }), "{code}: {e}");
        assert!(!e.is_retryable());
    }
    stub.set(
        400,
        "AccessDeniedException",
        "User: arn:aws:iam::123456789012:user/u (AKIAIOSFODNN7EXAMPLE) is not authorized",
    );
    let e = gen(&kms);
    assert_denied(&e, "kms:GenerateDataKey");
    assert!(!e.to_string().contains("AKIAIOSFODNN7EXAMPLE"), "{e}");
    assert_denied(&dec(&kms), "kms:Decrypt");
    let e = rt
        .block_on(kms.wrap(&kmsfs::crypto::Dek::generate(), &ctx(1)))
        .unwrap_err();
    assert_denied(&e, "kms:Encrypt");

    stub.set(400, "NotFoundException", "Key does not exist");
    let e = gen(&kms);
    assert!(matches!(e, KmsError::KeyNotFound { .. }), "{e}");
    assert!(e.to_string().contains(REGION), "{e}");

    for code in ["DisabledException", "KMSInvalidStateException"] {
        stub.set(400, code, "key is disabled");
        for e in [gen(&kms), dec(&kms)] {
            assert!(
                matches!(e, KmsError::KeyVersionUnusable { .. }),
                "{code}: {e}"
            );
            assert!(!e.is_retryable());
        }
    }
    for code in ["InvalidCiphertextException", "IncorrectKeyException"] {
        stub.set(400, code, "");
        let e = dec(&kms);
        assert!(matches!(e, KmsError::UnwrapFailed { .. }), "{code}: {e}");
        assert!(!e.is_retryable());
    }
    for (status, code) in [
        (500, "KMSInternalException"),
        (400, "ThrottlingException"),
        (503, "ServiceUnavailable"),
    ] {
        stub.set(status, code, "try again");
        let e = gen(&kms);
        assert!(e.is_retryable(), "{code}: {e}");
    }
    stub.set(400, "DependencyTimeoutException", "");
    assert!(matches!(gen(&kms), KmsError::Timeout { .. }));
    // No message carries the secret key.
    stub.set(400, "UnrecognizedClientException", "");
    assert!(!gen(&kms).to_string().contains("testing"));
}

/// The names of `kv`'s versions, oldest first.
fn names(kv: &KeyVersions) -> Vec<&str> {
    kv.versions.iter().map(|v| v.version.as_str()).collect()
}

/// moto implements DescribeKey, ListKeyRotations and RotateKeyOnDemand
/// (without key material IDs): versions are `initial` and one
/// `rotation-N` per rotation, and AWS never names one in key references.
#[test]
fn key_versions_and_rotation_on_moto() {
    let moto = Moto::start();
    let rt = KmsRuntime::new().unwrap();
    let admin = rt.block_on(moto.admin());
    let meta = rt
        .block_on(admin.create_key().description("kmsfs test: rotated").send())
        .unwrap()
        .key_metadata
        .unwrap();
    let key_id = meta.key_id().to_owned();
    let created = meta.creation_date().map(|d| d.secs());
    assert!(created.is_some(), "moto reports no CreationDate");
    let kms = connect(&rt, &moto.config(&key_id)).unwrap();

    let before = rt.block_on(kms.key_versions()).unwrap();
    assert_eq!(before.current, None, "{before:?}");
    assert_eq!(names(&before), ["initial"]);
    assert_eq!(before.versions[0].created, created);
    assert!(before.versions[0].can_unwrap);
    assert_eq!(before.current_created, created);
    let (dek, wrapped) = rt.block_on(kms.generate_dek(&ctx(5))).unwrap();

    let once = rt.block_on(kms.rotate()).unwrap();
    assert_eq!(once.current, None, "{once:?}");
    assert_eq!(names(&once), ["initial", "rotation-1"]);
    let rotated = once.versions[1].created.expect("a rotation date");
    assert!(rotated >= created.unwrap(), "{once:?}");
    assert_eq!(once.current_created, Some(rotated));
    assert!(once.versions.iter().all(|v| v.can_unwrap));

    let twice = rt.block_on(kms.rotate()).unwrap();
    assert_eq!(names(&twice), ["initial", "rotation-1", "rotation-2"]);
    let dates: Vec<i64> = twice.versions.iter().map(|v| v.created.unwrap()).collect();
    assert!(dates.windows(2).all(|w| w[0] <= w[1]), "{twice:?}");
    assert_eq!(twice.current_created, Some(dates[2]));
    assert_eq!(rt.block_on(kms.key_versions()).unwrap(), twice);

    // Wraps still name no version, and a DEK from before unwraps.
    let (_, after) = rt.block_on(kms.generate_dek(&ctx(5))).unwrap();
    assert_eq!(after.key_ref.key_version, "");
    assert_eq!(
        rt.block_on(kms.unwrap(&wrapped, &ctx(5)))
            .unwrap()
            .as_bytes(),
        dek.as_bytes()
    );
    // The key through its alias: the same key, the same versions.
    rt.block_on(
        admin
            .create_alias()
            .alias_name("alias/kmsfs-rotated")
            .target_key_id(&key_id)
            .send(),
    )
    .unwrap();
    let by_alias = connect(&rt, &moto.config("alias/kmsfs-rotated")).unwrap();
    assert_eq!(rt.block_on(by_alias.key_versions()).unwrap(), twice);

    // A disabled key unwraps under none of its materials.
    rt.block_on(admin.disable_key().key_id(&key_id).send())
        .unwrap();
    let disabled = rt.block_on(kms.key_versions()).unwrap();
    assert_eq!(names(&disabled), names(&twice));
    assert!(
        disabled.versions.iter().all(|v| !v.can_unwrap),
        "{disabled:?}"
    );
}

/// ListKeyRotations is read page by page, and its KeyMaterialIds name the
/// rotations; refusals of the key-version calls name the IAM action, and a
/// key or endpoint that cannot rotate is `Unsupported`.
#[test]
fn key_version_calls_are_paged_and_classified() {
    setup_env();
    let stub = StubKms::start();
    let rt = KmsRuntime::new().unwrap();
    let kms = connect(&rt, &config_at(&stub.url, "alias/stub")).unwrap();

    stub.script(
        "ListKeyRotations",
        &[
            serde_json::json!({
                "Rotations": [{"KeyId": STUB_ARN, "RotationDate": 1_700_000_200.0,
                               "RotationType": "AUTOMATIC", "KeyMaterialId": "bb01"}],
                "Truncated": true,
                "NextMarker": "page-2"
            }),
            serde_json::json!({
                "Rotations": [{"KeyId": STUB_ARN, "RotationDate": 1_700_000_100.0,
                               "RotationType": "ON_DEMAND"}],
                "Truncated": false
            }),
        ],
    );
    let kv = rt.block_on(kms.key_versions()).unwrap();
    assert_eq!(names(&kv), ["initial", "rotation-1", "rotation-2:bb01"]);
    assert_eq!(
        kv.versions[0].created, None,
        "the stub reports no CreationDate"
    );
    assert_eq!(kv.versions[1].created, Some(1_700_000_100));
    assert_eq!(kv.current, None);
    assert_eq!(kv.current_created, Some(1_700_000_200));
    let pages = stub.bodies("ListKeyRotations");
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert_eq!(pages[0]["KeyId"], STUB_ARN);
    assert!(pages[0].get("Marker").is_none(), "{pages:?}");
    assert_eq!(pages[1]["Marker"], "page-2");

    // A truncated page without a marker would loop: refused.
    stub.script(
        "ListKeyRotations",
        &[serde_json::json!({"Rotations": [], "Truncated": true})],
    );
    let e = rt.block_on(kms.key_versions()).unwrap_err();
    assert!(matches!(e, KmsError::Config(_)), "{e}");

    stub.set(
        400,
        "AccessDeniedException",
        "User: arn:aws:iam::123456789012:user/u (AKIAIOSFODNN7EXAMPLE) is not authorized",
    );
    let e = rt.block_on(kms.key_versions()).unwrap_err();
    assert_denied(&e, "kms:ListKeyRotations");
    assert!(!e.to_string().contains("AKIAIOSFODNN7EXAMPLE"), "{e}");
    let e = rt.block_on(kms.rotate()).unwrap_err();
    assert_denied(&e, "kms:RotateKeyOnDemand");
    assert!(e.to_string().contains("kms:RotateKeyOnDemand"), "{e}");

    let unsupported = |e: KmsError, operation: &str, says: &str| {
        eprintln!("{e}");
        assert!(
            matches!(&e, KmsError::Unsupported { operation: o, .. } if *o == operation),
            "{e}"
        );
        assert!(e.to_string().contains(says), "{e}");
        assert!(!e.is_retryable());
    };
    stub.set(
        400,
        "UnsupportedOperationException",
        "arn:... is not a symmetric encryption key",
    );
    unsupported(
        rt.block_on(kms.rotate()).unwrap_err(),
        "rotate the key",
        "symmetric",
    );
    unsupported(
        rt.block_on(kms.key_versions()).unwrap_err(),
        "list key versions",
        "custom key stores",
    );
    stub.set(400, "UnknownOperationException", "");
    unsupported(
        rt.block_on(kms.rotate()).unwrap_err(),
        "rotate the key",
        "does not implement kms:RotateKeyOnDemand",
    );
    unsupported(
        rt.block_on(kms.key_versions()).unwrap_err(),
        "list key versions",
        "does not implement kms:ListKeyRotations",
    );
    // The on-demand rotation quota is not a throttle to retry; elsewhere a
    // LimitExceededException still is.
    stub.set(400, "LimitExceededException", "quota exceeded");
    unsupported(
        rt.block_on(kms.rotate()).unwrap_err(),
        "rotate the key",
        "enable-key-rotation",
    );
    let e = rt
        .block_on(kms.generate_dek(&ctx(1)))
        .map(|_| ())
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
    // A rotation was asked for each time, never more than once per call.
    assert_eq!(stub.bodies("RotateKeyOnDemand").len(), 4);
    assert!(stub
        .bodies("RotateKeyOnDemand")
        .iter()
        .all(|b| b["KeyId"] == STUB_ARN));
}

#[test]
fn unreachable_endpoint_fails_fast_and_retryable() {
    setup_env();
    let rt = KmsRuntime::new().unwrap();
    // A port nothing listens on: connection refused.
    let closed = common::free_port();
    let cfg = config_at(&format!("http://127.0.0.1:{closed}"), "alias/kmsfs-dev");
    let err = fails_fast("connected to a closed port", Duration::from_secs(3), || {
        connect(&rt, &cfg)
    });
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err}");

    // A server that accepts and never answers: timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = AwsConfig {
        endpoint: Some(format!("http://{}", silent.local_addr().unwrap())),
        allow_http: true,
        timeout_secs: 1,
        ..cfg
    };
    let err = fails_fast("a silent server answered", Duration::from_secs(5), || {
        connect(&rt, &cfg)
    });
    assert!(matches!(err, KmsError::Timeout { .. }), "{err}");
    drop(silent);
}

#[test]
fn missing_region_is_a_clear_error() {
    setup_env();
    let rt = KmsRuntime::new().unwrap();
    let cfg = AwsConfig {
        region: None,
        timeout_secs: 2,
        ..config_at("http://127.0.0.1:1", "alias/kmsfs-dev")
    };
    let err = connect(&rt, &cfg)
        .err()
        .expect("connected without a region");
    assert!(matches!(err, KmsError::Config(_)), "{err}");
    assert!(err.to_string().contains("--aws-region"), "{err}");
}

/// A kmsfs mount, detached on drop.
struct Mounted {
    mnt: PathBuf,
    mounted: bool,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            common::detach(&self.mnt);
        }
    }
}

fn kmsfs_with(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    common::run_with(env, args, true)
}

fn mount(env: &[(&str, &str)], p: &Places) -> Mounted {
    kmsfs_with(
        env,
        &[
            "mount",
            p.backing.to_str().unwrap(),
            p.mnt.to_str().unwrap(),
            "--log-file",
            p.log.to_str().unwrap(),
        ],
    );
    Mounted {
        mnt: p.mnt.clone(),
        mounted: true,
    }
}

fn umount(env: &[(&str, &str)], m: &mut Mounted) {
    kmsfs_with(env, &["umount", m.mnt.to_str().unwrap()]);
    m.mounted = false;
    common::wait_for_daemon_exit(&m.mnt);
}

#[test]
fn mount_write_remount_read_with_aws_kms() {
    let moto = Moto::start();
    let p = Places::new("kmsfs-aws");
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", REGION),
    ];
    kmsfs_with(
        &env,
        &[
            "init",
            p.backing.to_str().unwrap(),
            "--kms",
            "aws",
            "--aws-key-id",
            moto.alias(),
            "--aws-region",
            REGION,
            "--aws-endpoint",
            moto.url(),
        ],
    );
    let data = common::pattern(300_000, 11);
    let mut m = mount(&env, &p);
    std::fs::write(p.mnt.join("hello.bin"), &data).unwrap();
    std::fs::create_dir(p.mnt.join("sub")).unwrap();
    std::fs::write(p.mnt.join("sub/small.txt"), b"hello aws kms\n").unwrap();
    umount(&env, &mut m);
    assert!(!std::fs::read(p.backing.join("hello.bin"))
        .unwrap()
        .windows(64)
        .any(|w| w == &data[..64]));

    let mut m = mount(&env, &p);
    assert_eq!(std::fs::read(p.mnt.join("hello.bin")).unwrap(), data);
    assert_eq!(
        std::fs::read(p.mnt.join("sub/small.txt")).unwrap(),
        b"hello aws kms\n"
    );

    let out = kmsfs_with(
        &env,
        &[
            "info",
            "--verify",
            p.mnt.join("hello.bin").to_str().unwrap(),
        ],
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Headers name the provider of the trusted configuration (aws, aws-2, ...).
    let provider = info["key"]["provider"].as_str().unwrap_or_default();
    assert!(provider.starts_with("aws"), "{info}");
    assert_eq!(info["format_version"], 2, "{info}");
    assert_eq!(info["key"]["key_id"], moto.key_arn(), "{info}");
    assert_eq!(info["header_verified"], true, "{info}");
    umount(&env, &mut m);
    let log_text = std::fs::read_to_string(&p.log).unwrap_or_default();
    assert!(
        !log_text.contains("testing"),
        "credentials in the log?\n{log_text}"
    );
}

#[test]
fn assume_role_goes_through_sts() {
    let moto = Moto::start();
    let p = Places::new("kmsfs-aws-role");
    let init = |env: &[(&str, &str)]| {
        common::run_with(
            env,
            &[
                "init",
                p.backing.to_str().unwrap(),
                "--kms",
                "aws",
                "--aws-key-id",
                moto.key_id(),
                "--aws-region",
                REGION,
                "--aws-endpoint",
                moto.url(),
                "--aws-assume-role",
                "arn:aws:iam::123456789012:role/kmsfs-test",
                "--aws-external-id",
                "kmsfs-ext-123",
            ],
            false,
        )
    };
    // STS unreachable (the process-wide default): the role cannot be
    // assumed, so init (which wraps the volume's key) fails with a
    // credentials error, and leaves no volume behind.
    let out = init(&[]);
    assert!(!out.status.success(), "initialised without STS");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("credentials"), "{stderr}");
    assert!(!p.backing.join(".kmsfs-config.toml").exists());

    // STS on moto: the role is assumed and its credentials used for KMS.
    let env = [("AWS_ENDPOINT_URL_STS", moto.url())];
    assert!(init(&env).status.success());
    let mut m = mount(&env, &p);
    std::fs::write(p.mnt.join("f"), b"role data").unwrap();
    umount(&env, &mut m);
    let mut m = mount(&env, &p);
    assert_eq!(std::fs::read(p.mnt.join("f")).unwrap(), b"role data");
    umount(&env, &mut m);
}
