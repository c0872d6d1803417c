//! The contract every KMS provider keeps, checked by one function against
//! each: the local keyring, Vault (a real OpenBao dev server), AWS (a real
//! moto server), Azure Key Vault and GCP Cloud KMS (their HTTP(S) mocks), and
//! the in-memory fake. Providers are built the way a mount builds them
//! (`KmsConfig`), so each call goes through the one timeout layer.
//!
//! The contract: a generated or wrapped DEK unwraps to itself; under another
//! wrap context (another file ID), or tampered with, it fails with
//! `UnwrapFailed`; an unreachable KMS fails quickly with a retryable error;
//! no error text (Display or Debug) holds a credential or DEK bytes.
//! The servers' tests fail, never skip, when a server cannot be started.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use kmsfs::crypto::Dek;
use kmsfs::kms::config::KmsConfig;
use kmsfs::kms::instrumented::Instrumented;
use kmsfs::kms::testing::FakeKms;
use kmsfs::kms::{KeyProvider, KmsError, KmsRuntime, WrapContext, WrappedDek};

/// How long an unreachable KMS may take to fail, at most.
const FAIL_FAST: Duration = Duration::from_secs(5);

type Pending = Pin<Box<dyn Future<Output = KmsError>>>;

/// One provider under test.
struct Subject {
    provider: Arc<dyn KeyProvider>,
    /// Connects to the same kind of KMS at an address where nothing
    /// answers and makes one call; the error it fails with. `None` where
    /// nothing can be unreachable (a keyring file).
    unreachable: Option<Pending>,
    /// Credentials (or their telling parts) no error text may contain.
    secrets: Vec<String>,
}

fn ctx(n: u8) -> WrapContext {
    WrapContext::file_v1([n; 16])
}

/// The same blob with one byte changed, staying printable where it was
/// (text ciphertexts such as Vault's `vault:v1:...`).
fn tampered(w: &WrappedDek) -> WrappedDek {
    let mut bad = w.clone();
    let i = bad.blob.len() * 3 / 4;
    let b = bad.blob[i];
    bad.blob[i] = if b.is_ascii_alphanumeric() {
        if b == b'A' {
            b'B'
        } else {
            b'A'
        }
    } else {
        b ^ 1
    };
    bad
}

/// The contract, checked on `s`.
async fn check_contract(s: Subject) {
    let p = &s.provider;
    let (dek, wrapped) = p.generate_dek(&ctx(1)).await.expect("generate");
    let back = p.unwrap(&wrapped, &ctx(1)).await.expect("unwrap");
    assert_eq!(back.as_bytes(), dek.as_bytes(), "round trip");
    let dek2 = Dek::generate();
    let wrapped2 = p.wrap(&dek2, &ctx(2)).await.expect("wrap");
    let back2 = p.unwrap(&wrapped2, &ctx(2)).await.expect("unwrap");
    assert_eq!(back2.as_bytes(), dek2.as_bytes(), "wrap round trip");
    assert!(p.handles(&wrapped.key_ref), "{:?}", wrapped.key_ref);

    let mut errors = Vec::new();
    let err = common::kms::unwrap_err(p.unwrap(&wrapped, &ctx(9)).await);
    assert!(
        matches!(err, KmsError::UnwrapFailed { .. }),
        "another file ID: {err}"
    );
    assert!(!err.is_retryable(), "{err}");
    errors.push(err);
    let err = common::kms::unwrap_err(p.unwrap(&tampered(&wrapped), &ctx(1)).await);
    assert!(
        matches!(err, KmsError::UnwrapFailed { .. }),
        "tampered: {err}"
    );
    errors.push(err);

    if let Some(unreachable) = s.unreachable {
        let start = Instant::now();
        let err = unreachable.await;
        assert!(err.is_retryable(), "unreachable: {err}");
        assert!(
            start.elapsed() < FAIL_FAST,
            "unreachable took {:?}: {err}",
            start.elapsed()
        );
        errors.push(err);
    }

    let mut forbidden = s.secrets.clone();
    for d in [&dek, &dek2] {
        forbidden.push(hex::encode(d.as_bytes()));
        forbidden.push(base64::engine::general_purpose::STANDARD.encode(d.as_bytes()));
        forbidden.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_bytes()));
    }
    for e in &errors {
        for text in [e.to_string(), format!("{e:?}")] {
            for f in &forbidden {
                assert!(
                    !text.contains(f.as_str()),
                    "an error text leaks {f:?}: {text}"
                );
            }
        }
    }
}

/// A loopback port nothing listens on.
#[cfg_attr(
    not(any(feature = "vault", feature = "aws", feature = "gcp")),
    allow(dead_code)
)]
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Connects `cfg` as a mount does and makes one call: the error.
#[cfg_attr(
    not(any(feature = "vault", feature = "aws", feature = "gcp")),
    allow(dead_code)
)]
fn connect_and_call(cfg: KmsConfig) -> Pending {
    Box::pin(async move {
        match cfg.connect().await {
            Ok(p) => p.check().await.expect_err("an unreachable KMS answered"),
            Err(kmsfs::kms::config::ConnectError::Kms(e)) => e,
            Err(e) => panic!("not a KMS error: {e}"),
        }
    })
}

fn connected(rt: &KmsRuntime, cfg: &KmsConfig) -> Arc<dyn KeyProvider> {
    cfg.build(rt)
        .unwrap_or_else(|e| panic!("connect {cfg:?}: {e}"))
}

#[test]
fn local_keyring() {
    let rt = KmsRuntime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    let mut kr = kmsfs::kms::local::Keyring::create_empty(&key_file).unwrap();
    kr.create_key("default").unwrap();
    // The keyring's secret: its base64 KEK ("key NAME VERSION KEK").
    let secrets = std::fs::read_to_string(&key_file)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("key "))
        .filter_map(|l| l.split(' ').nth(2).map(str::to_owned))
        .collect::<Vec<_>>();
    assert!(!secrets.is_empty());
    let cfg = KmsConfig::Local {
        key_file,
        key: "default".into(),
    };
    let provider = connected(&rt, &cfg);
    rt.block_on(check_contract(Subject {
        provider,
        unreachable: None,
        secrets,
    }));
}

#[test]
fn fake_kms() {
    let rt = KmsRuntime::new().unwrap();
    let timeout = Duration::from_millis(200);
    let stalled = Arc::new(FakeKms::new("fake"));
    stalled.set_stalled(true);
    let stalled = Instrumented::bounded(stalled, timeout);
    rt.block_on(check_contract(Subject {
        provider: Instrumented::bounded(Arc::new(FakeKms::new("fake")), timeout),
        unreachable: Some(Box::pin(async move {
            stalled.check().await.expect_err("a stalled KMS answered")
        })),
        secrets: vec![],
    }));
}

#[cfg(feature = "vault")]
#[test]
fn vault_on_openbao() {
    let bao = common::kms::vault::Bao::start();
    let rt = KmsRuntime::new().unwrap();
    // What `kmsfs mount` reads the token from; the only Vault user here.
    std::env::set_var("VAULT_TOKEN", bao.token());
    let cfg = KmsConfig::Vault(bao.config());
    let provider = connected(&rt, &cfg);
    let mut down = bao.config();
    down.address = format!("http://127.0.0.1:{}", closed_port());
    down.timeout_secs = 2;
    rt.block_on(check_contract(Subject {
        provider,
        unreachable: Some(connect_and_call(KmsConfig::Vault(down))),
        secrets: vec![bao.token().to_owned()],
    }));
}

#[cfg(feature = "aws")]
#[test]
fn aws_on_moto() {
    use common::kms::aws::Moto;
    let moto = Moto::start();
    let rt = KmsRuntime::new().unwrap();
    let provider = connected(&rt, &KmsConfig::Aws(moto.config(moto.key_id())));
    let mut down = moto.config(moto.key_id());
    down.endpoint = Some(format!("http://127.0.0.1:{}", closed_port()));
    down.timeout_secs = 2;
    rt.block_on(check_contract(Subject {
        provider,
        unreachable: Some(connect_and_call(KmsConfig::Aws(down))),
        // moto's dummy credentials (key ID and secret key).
        secrets: vec!["testing".into()],
    }));
}

#[cfg(feature = "azure")]
#[test]
fn azure_on_mock() {
    use common::kms::azure::{FakeCredential, Mock, HOST, TOKEN};
    let rt = KmsRuntime::new().unwrap();
    rt.block_on(async {
        let mock = Mock::start().await;
        // The mock needs its own HTTP client, so the provider is built by
        // hand and bounded as `KmsConfig` bounds it.
        let bounded = |cfg: kmsfs::kms::azure::AzureConfig, addr| {
            let kms = mock.kms_with(&cfg, addr, Arc::new(FakeCredential::default()));
            Instrumented::bounded(Arc::new(kms), KmsConfig::Azure(cfg).timeout())
        };
        let provider = bounded(mock.cfg(None, 10), mock.addr());
        let closed = std::net::SocketAddr::from(([127, 0, 0, 1], closed_port()));
        let mut down_cfg = mock.cfg(None, 2);
        down_cfg.vault_url = format!("https://{HOST}:{}", closed.port());
        let down = bounded(down_cfg, closed);
        check_contract(Subject {
            provider,
            unreachable: Some(Box::pin(async move {
                down.check()
                    .await
                    .expect_err("an unreachable vault answered")
            })),
            secrets: vec![TOKEN.into()],
        })
        .await;
    });
}

#[cfg(feature = "gcp")]
#[test]
fn gcp_on_mock() {
    let rt = KmsRuntime::new().unwrap();
    rt.block_on(async {
        let mock = common::kms::gcp::Mock::start().await;
        let provider = KmsConfig::Gcp(mock.cfg(None)).connect().await.unwrap();
        let mut down = mock.cfg(None);
        down.endpoint = Some(format!("http://127.0.0.1:{}", closed_port()));
        down.timeout_secs = 2;
        // The service account's private key, and the JWTs signed with it.
        let key_file: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&mock.key_file).unwrap()).unwrap();
        let private_key = key_file["private_key"].as_str().unwrap();
        let key_line = private_key.lines().nth(1).unwrap().to_owned();
        check_contract(Subject {
            provider,
            unreachable: Some(connect_and_call(KmsConfig::Gcp(down))),
            secrets: vec![key_line, "eyJ".into()],
        })
        .await;
    });
}
