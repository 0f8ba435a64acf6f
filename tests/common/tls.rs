//! Certificates made for a test (rcgen: a CA, the server's certificate for 127.0.0.1 and
//! localhost, client certificates), the SSLConfig text that serves them, and real TLS
//! clients (hyper-rustls) for both ports.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;

/// A certificate and its key, PEM and DER.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// A certificate authority of its own.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Identity {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("certificate");
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// The server's certificate: the tests reach it as 127.0.0.1.
    pub fn server_identity(&self) -> Identity {
        self.issue(&["127.0.0.1", "localhost"])
    }
}

/// SSLConfig text format serving `server`, requiring client certificates from `client_ca`
/// when given.
pub fn ssl_config(server: &Identity, client_ca: Option<&Ca>) -> String {
    format!(
        "server_key: {:?}\nserver_cert: {:?}\ncustom_ca: {:?}\nclient_verify: {}\n",
        server.key_pem,
        server.cert_pem,
        client_ca.map_or("", |ca| ca.pem.as_str()),
        client_ca.is_some()
    )
}

/// A rustls client trusting `ca`, presenting `identity` when given.
fn client_config(ca: &Ca, identity: Option<&Identity>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).expect("trust the CA");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots);
    match identity {
        Some(identity) => builder
            .with_client_auth_cert(
                vec![identity.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone())),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    }
}

pub type TlsGrpcTransport = Client<HttpsConnector<HttpConnector>, tonic::body::Body>;

/// An HTTP/2 (gRPC) client over TLS; use it with `XxxClient::with_origin(client,
/// "https://127.0.0.1:PORT")`.
pub fn grpc_client(ca: &Ca, identity: Option<&Identity>) -> TlsGrpcTransport {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(ca, identity))
        .https_only()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector)
}

/// `method url` over HTTPS (HTTP/1.1) with `body`: the status and the body, or why there
/// was none.
pub async fn https_request(
    ca: &Ca,
    identity: Option<&Identity>,
    method: &str,
    url: &str,
    body: &str,
) -> Result<(u16, String), String> {
    https_request_with(ca, identity, method, url, body, &[]).await
}

/// [`https_request`] with extra request headers.
pub async fn https_request_with(
    ca: &Ca,
    identity: Option<&Identity>,
    method: &str,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(ca, identity))
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(super::TIMEOUT, client.request(request))
        .await
        .map_err(|_| format!("{url}: no answer"))?
        .map_err(|e| format!("{url}: {}", modelgate::error::error_chain(&e)))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Completes a TLS handshake with `addr` as `identity` and reads: the error that ends the
/// connection. Under TLS 1.3 a client finishes its side of the handshake before the server
/// has judged its certificate, so the server's refusal arrives as an alert on the first
/// read; an HTTP client may see only a closed connection, depending on timing.
pub async fn refusal(ca: &Ca, identity: Option<&Identity>, addr: std::net::SocketAddr) -> String {
    use tokio::io::AsyncReadExt;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca, identity)));
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = connector.connect(name, tcp).await?;
        let mut buf = [0u8; 64];
        loop {
            if tls.read(&mut buf).await? == 0 {
                return Ok::<_, std::io::Error>("closed without an alert".to_string());
            }
        }
    };
    match tokio::time::timeout(super::TIMEOUT, exchange).await {
        Err(_) => format!("{addr}: no refusal"),
        Ok(Ok(closed)) => closed,
        Ok(Err(e)) => e.to_string(),
    }
}
