//! `--ssl_config_file`: TF Serving's SSLConfig (protobuf text format; the key and
//! certificates inline as PEM text, as TF Serving reads them) turned into the rustls server
//! config of both ports. Anything that cannot be honoured is an error, so the server never
//! starts in plaintext or without client verification it was asked for.

use super::text_format::{parse_text_format, ConfigError};
use crate::proto::serving::SslConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::sync::Arc;

/// What `--ssl_config_file` gives the servers.
#[derive(Debug)]
pub struct Tls {
    pub server: Arc<ServerConfig>,
    /// Clients must present a certificate signed by `custom_ca` for anything but the probes
    /// (the serving layer lets a connection without one reach only those).
    pub client_verify: bool,
    /// Something in the file that has no effect, to be logged.
    pub warning: Option<String>,
}

/// The TLS config `--ssl_config_file=path` asks for.
pub fn tls_server_config(path: &str) -> Result<Tls, ConfigError> {
    let what = format!("--ssl_config_file={path}");
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        what: what.clone(),
        message: e.to_string(),
    })?;
    server_config(&what, &text)
}

fn server_config(what: &str, text: &str) -> Result<Tls, ConfigError> {
    let config: SslConfig = parse_text_format("tensorflow.serving.SSLConfig", what, text)?;
    let invalid =
        |field: &str, why: String| ConfigError::Invalid(format!("{what}: {field}: {why}"));
    let certs = certificates(&config.server_cert).map_err(|e| invalid("server_cert", e))?;
    let key = PrivateKeyDer::from_pem_slice(config.server_key.as_bytes())
        .map_err(|e| invalid("server_key", format!("no PEM private key ({e})")))?;

    // ring, as everywhere else in modelgate: no second crypto library.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("protocol versions", e.to_string()))?;
    let mut warning = None;
    let builder = if config.client_verify {
        let mut roots = RootCertStore::empty();
        for cert in certificates(&config.custom_ca).map_err(|e| {
            invalid(
                "custom_ca",
                format!("{e}; client_verify needs the CA that signs client certificates"),
            )
        })? {
            roots
                .add(cert)
                .map_err(|e| invalid("custom_ca", e.to_string()))?;
        }
        // A certificate, when presented, must be signed by custom_ca. A connection without
        // one completes its handshake so that a kubelet (which has no certificate) can
        // reach the probes; `api::serve` refuses it everything else.
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| invalid("custom_ca", e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        if !config.custom_ca.trim().is_empty() {
            // As in TF Serving: the CA only matters when client certificates are required.
            warning = Some(format!(
                "{what}: custom_ca is ignored without client_verify: true"
            ));
        }
        builder.with_no_client_auth()
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid("server_key and server_cert", e.to_string()))?;
    // Both ports serve HTTP/2 and HTTP/1.1; gRPC clients insist on negotiating h2.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Tls {
        server: Arc::new(server),
        client_verify: config.client_verify,
        warning,
    })
}

/// Every certificate of a PEM text; at least one.
fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate ({e})"))?;
    if certs.is_empty() {
        return Err("no PEM certificate".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, IsCa, Issuer, KeyPair};

    struct Pems {
        ca: String,
        cert: String,
        key: String,
    }

    fn pems() -> Pems {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        Pems {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn text(key: &str, cert: &str, ca: &str, verify: bool) -> String {
        format!(
            "server_key: {key:?}\nserver_cert: {cert:?}\ncustom_ca: {ca:?}\nclient_verify: {verify}\n"
        )
    }

    fn error(text: &str) -> String {
        server_config("ssl.config", text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_with_and_without_client_verification() {
        let p = pems();
        let tls = server_config("ssl.config", &text(&p.key, &p.cert, "", false)).unwrap();
        assert_eq!(tls.server.alpn_protocols[0], b"h2");
        assert!(!tls.client_verify && tls.warning.is_none());
        let tls = server_config("ssl.config", &text(&p.key, &p.cert, &p.ca, false)).unwrap();
        assert!(tls.warning.unwrap().contains("custom_ca is ignored"));
        let tls = server_config("ssl.config", &text(&p.key, &p.cert, &p.ca, true)).unwrap();
        assert!(tls.client_verify);
    }

    #[test]
    fn what_cannot_be_used_is_named() {
        let p = pems();
        let other = pems();
        assert!(error("server_key: 1").starts_with("ssl.config: line 1"));
        assert!(error(&text(&p.key, "", "", false)).contains("server_cert: no PEM certificate"));
        assert!(error(&text("", &p.cert, "", false)).contains("server_key: no PEM private key"));
        // A certificate where the key belongs.
        assert!(error(&text(&p.cert, &p.cert, "", false)).contains("server_key"));
        assert!(error(&text(&other.key, &p.cert, "", false)).contains("server_key and server_cert"));
        assert!(error(&text(&p.key, &p.cert, "", true)).contains("custom_ca: no PEM certificate"));
        assert!(error(&text(&p.key, &p.cert, "garbage", true)).contains("custom_ca"));
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let err = tls_server_config("/no/such/ssl.config")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read --ssl_config_file=/no/such/ssl.config"),
            "{err}"
        );
    }
}
