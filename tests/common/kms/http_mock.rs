//! A local HTTP or HTTPS server standing in for a KMS's REST API: it records
//! every request, answers each through the KMS's handler (one request per
//! connection), and can be told to accept requests and never answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How a KMS mock answers: normally, or with one of the failures a KMS
/// service can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// The credentials are rejected: 401.
    Reject401,
    /// The operation is not allowed: 403.
    Deny403,
    /// The key (version) is disabled.
    Disabled,
}

/// One request as the server read it; path and query are percent-decoded.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    /// Names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// A query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// Whether the body is declared JSON.
    pub fn sends_json(&self) -> bool {
        self.header("content-type")
            .is_some_and(|t| t.starts_with("application/json"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON request body")
    }
}

/// An answer: a JSON body with its status and any extra headers.
pub struct Resp {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Resp {
    pub fn json(status: u16, body: serde_json::Value) -> Resp {
        Resp {
            status,
            body: body.to_string(),
            headers: Vec::new(),
        }
    }
}

/// What a KMS mock answers a request with.
pub type Handler = Arc<dyn Fn(&Req) -> Resp + Send + Sync>;

pub struct MockServer {
    pub addr: SocketAddr,
    /// With HTTPS: the DER certificate of the CA that issued the server's.
    pub ca_der: Option<Vec<u8>>,
    requests: Arc<Mutex<Vec<Req>>>,
    hanging: Arc<AtomicBool>,
}

impl MockServer {
    /// A plain HTTP server on a free loopback port.
    pub async fn http(handler: Handler) -> MockServer {
        Self::start(None, handler).await
    }

    /// An HTTPS server on a free loopback port, with a certificate for
    /// `host` issued by a fresh CA (see [`MockServer::ca_der`]).
    pub async fn https(host: &str, handler: Handler) -> MockServer {
        let (acceptor, ca_der) = tls_for(host);
        let mut server = Self::start(Some(acceptor), handler).await;
        server.ca_der = Some(ca_der);
        server
    }

    async fn start(tls: Option<tokio_rustls::TlsAcceptor>, handler: Handler) -> MockServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conn = Connection {
            handler,
            requests: Arc::new(Mutex::new(Vec::new())),
            hanging: Arc::new(AtomicBool::new(false)),
        };
        let server = MockServer {
            addr,
            ca_der: None,
            requests: conn.requests.clone(),
            hanging: conn.hanging.clone(),
        };
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conn = conn.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                conn.serve(stream).await;
                            }
                        }
                        None => conn.serve(tcp).await,
                    }
                });
            }
        });
        server
    }

    pub fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }

    /// From now on, read and record requests but never answer them.
    pub fn hang(&self) {
        self.hanging.store(true, Ordering::SeqCst);
    }
}

/// What each connection's task needs.
#[derive(Clone)]
struct Connection {
    handler: Handler,
    requests: Arc<Mutex<Vec<Req>>>,
    hanging: Arc<AtomicBool>,
}

impl Connection {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut s: S) {
        let Some(req) = read_request(&mut s).await else {
            return;
        };
        self.requests.lock().unwrap().push(req.clone());
        if self.hanging.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        let resp = (self.handler)(&req);
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n",
            resp.status,
            reason(resp.status),
            resp.body.len()
        );
        for (name, value) in &resp.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&resp.body);
        let _ = s.write_all(out.as_bytes()).await;
        let _ = s.shutdown().await;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Other",
    }
}

/// A TLS acceptor with a certificate for `host` issued by a fresh CA, and
/// that CA's DER certificate.
fn tls_for(host: &str) -> (tokio_rustls::TlsAcceptor, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kmsfs test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![host.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let tls = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        ca.der().to_vec(),
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Reads one HTTP/1.1 request (headers, Content-Length body).
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<Req> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let mut headers = HashMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers
        .get("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Req {
        method,
        path: percent_decode(path),
        query,
        headers,
        body,
    })
}
