//! Who the peers are: the ready addresses of this Deployment's Service, read from the
//! Kubernetes Endpoints API (`GET /api/v1/namespaces/{ns}/endpoints/{service}`).
//!
//! The API is reached over plain HTTP, normally through a `kubectl proxy` sidecar on
//! `localhost:8001` that adds the pod's service-account credentials and verifies the API
//! server's certificate; that keeps TLS and token handling out of this binary.

use crate::http_client::{self, HttpClient};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The REST port's name in the Service, and TF Serving's REST port when no port is named.
const HTTP_PORT_NAME: &str = "http";
const DEFAULT_HTTP_PORT: u16 = 8501;

/// The largest Endpoints answer read; a Service with thousands of pods stays far below it.
const MAX_ENDPOINTS_BYTES: usize = 4 << 20;

/// One pod a fan-out reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The pod's name, from the address's `targetRef`, when the API gives one.
    pub pod: Option<String>,
    /// Where its REST port listens.
    pub address: SocketAddr,
    /// Whether the Endpoints list it as ready; a pod that is not gets no call.
    pub ready: bool,
}

/// Why the peers could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("cannot reach the Kubernetes API at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the Kubernetes API answered {status} for {url}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("cannot read the Endpoints from {url}: {message}")]
    Malformed { url: String, message: String },
}

/// Where the Endpoints of this Deployment's Service are read.
#[derive(Clone, Debug)]
pub struct EndpointsSource {
    url: String,
}

impl EndpointsSource {
    /// Checks the parts that go into the URL, so that a request can never be steered
    /// elsewhere by a namespace or service name.
    pub fn new(api_url: &str, namespace: &str, service: &str) -> Result<EndpointsSource, String> {
        let base = api_url.trim_end_matches('/');
        if !base.starts_with("http://") {
            return Err(format!(
                "--kubernetes_api_url={api_url}: only http:// URLs are supported \
                 (run the `kubectl proxy` sidecar, which handles TLS and credentials)"
            ));
        }
        base.parse::<hyper::Uri>()
            .map_err(|e| format!("--kubernetes_api_url={api_url}: {e}"))?;
        for (flag, value) in [
            ("--fanout_namespace", namespace),
            ("--fanout_service", service),
        ] {
            if !is_dns_label(value) {
                return Err(format!(
                    "{flag}={value}: not a Kubernetes name (lowercase letters, digits and '-', \
                     at most 63 characters)"
                ));
            }
        }
        Ok(EndpointsSource {
            url: format!("{base}/api/v1/namespaces/{namespace}/endpoints/{service}"),
        })
    }

    /// The URL the Endpoints are read from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Lists the pods behind the Service, ready or not.
    pub async fn peers(
        &self,
        client: &HttpClient,
        timeout: Duration,
    ) -> Result<Vec<Peer>, PeersError> {
        let request = hyper::Request::get(self.url.as_str())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Default::default())
            .map_err(|e| PeersError::Unreachable {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        let (status, body) = http_client::send(client, request, timeout, MAX_ENDPOINTS_BYTES)
            .await
            .map_err(|e| PeersError::Unreachable {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        if status != 200 {
            return Err(PeersError::Refused {
                url: self.url.clone(),
                status,
                message: api_status_message(&body),
            });
        }
        let endpoints: Endpoints =
            serde_json::from_slice(&body).map_err(|e| PeersError::Malformed {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        peers_from_endpoints(&endpoints).map_err(|message| PeersError::Malformed {
            url: self.url.clone(),
            message,
        })
    }
}

/// A Kubernetes object name usable as one path segment (RFC 1123 label).
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The `message` of a Kubernetes `Status` answer, else the start of the body.
fn api_status_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Status {
        message: String,
    }
    match serde_json::from_slice::<Status>(body) {
        Ok(status) => status.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

/// The parts of a `v1/Endpoints` object that name the pods and their ports.
#[derive(Debug, Default, Deserialize)]
pub struct Endpoints {
    #[serde(default)]
    pub subsets: Vec<EndpointSubset>,
}

/// Addresses that share one set of ports.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSubset {
    #[serde(default)]
    pub addresses: Vec<EndpointAddress>,
    #[serde(default)]
    pub not_ready_addresses: Vec<EndpointAddress>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointAddress {
    pub ip: String,
    pub target_ref: Option<ObjectReference>,
}

#[derive(Debug, Deserialize)]
pub struct ObjectReference {
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u16,
}

/// Every address of every subset with its REST port: the port named `http`, else 8501, else
/// the subset's only port. Ready addresses come first, then the others, each in API order.
pub fn peers_from_endpoints(endpoints: &Endpoints) -> Result<Vec<Peer>, String> {
    let mut ready = Vec::new();
    let mut not_ready = Vec::new();
    for subset in &endpoints.subsets {
        if subset.addresses.is_empty() && subset.not_ready_addresses.is_empty() {
            continue;
        }
        let port = http_port(&subset.ports).ok_or_else(|| {
            let ports: Vec<String> = subset.ports.iter().map(|p| p.port.to_string()).collect();
            format!(
                "no port named '{HTTP_PORT_NAME}' (nor {DEFAULT_HTTP_PORT}) among ports [{}]",
                ports.join(", ")
            )
        })?;
        for (addresses, is_ready, into) in [
            (&subset.addresses, true, &mut ready),
            (&subset.not_ready_addresses, false, &mut not_ready),
        ] {
            for address in addresses {
                let ip: IpAddr = address
                    .ip
                    .parse()
                    .map_err(|_| format!("'{}' is not an IP address", address.ip))?;
                into.push(Peer {
                    pod: address.target_ref.as_ref().and_then(|r| r.name.clone()),
                    address: SocketAddr::new(ip, port),
                    ready: is_ready,
                });
            }
        }
    }
    ready.extend(not_ready);
    Ok(ready)
}

fn http_port(ports: &[EndpointPort]) -> Option<u16> {
    ports
        .iter()
        .find(|p| p.name.as_deref() == Some(HTTP_PORT_NAME))
        .or_else(|| ports.iter().find(|p| p.port == DEFAULT_HTTP_PORT))
        .or(match ports {
            [only] => Some(only),
            _ => None,
        })
        .map(|p| p.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Vec<Peer>, String> {
        peers_from_endpoints(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn ready_and_not_ready_addresses_with_the_http_port() {
        // The shape `kubectl get endpoints modelgate -o json` prints.
        let peers = parse(
            r#"{
              "kind": "Endpoints", "apiVersion": "v1",
              "metadata": {"name": "modelgate", "namespace": "ml"},
              "subsets": [{
                "addresses": [
                  {"ip": "10.0.1.5", "nodeName": "n1",
                   "targetRef": {"kind": "Pod", "namespace": "ml", "name": "modelgate-a", "uid": "u1"}},
                  {"ip": "10.0.1.6"}
                ],
                "notReadyAddresses": [
                  {"ip": "10.0.1.7", "targetRef": {"kind": "Pod", "name": "modelgate-c"}}
                ],
                "ports": [
                  {"name": "grpc", "port": 8500, "protocol": "TCP"},
                  {"name": "http", "port": 9001, "protocol": "TCP"}
                ]
              }]
            }"#,
        )
        .unwrap();
        assert_eq!(
            peers,
            vec![
                Peer {
                    pod: Some("modelgate-a".into()),
                    address: "10.0.1.5:9001".parse().unwrap(),
                    ready: true
                },
                Peer {
                    pod: None,
                    address: "10.0.1.6:9001".parse().unwrap(),
                    ready: true
                },
                Peer {
                    pod: Some("modelgate-c".into()),
                    address: "10.0.1.7:9001".parse().unwrap(),
                    ready: false
                },
            ]
        );
    }

    #[test]
    fn port_fallbacks_and_empty_endpoints() {
        let by_number = r#"{"subsets": [{"addresses": [{"ip": "fd00::1"}],
            "ports": [{"name": "x", "port": 8500}, {"name": "y", "port": 8501}]}]}"#;
        assert_eq!(
            parse(by_number).unwrap()[0].address,
            "[fd00::1]:8501".parse().unwrap()
        );
        let only = r#"{"subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]}"#;
        assert_eq!(parse(only).unwrap()[0].address.port(), 80);
        // A Service with no pods has no subsets at all.
        assert_eq!(parse(r#"{"kind": "Endpoints"}"#).unwrap(), vec![]);
    }

    #[test]
    fn unusable_endpoints_are_errors() {
        let no_http = r#"{"subsets": [{"addresses": [{"ip": "10.0.0.1"}],
            "ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]}]}"#;
        assert!(parse(no_http).unwrap_err().contains("no port named 'http'"));
        let bad_ip = r#"{"subsets": [{"addresses": [{"ip": "pod-a"}], "ports": [{"port": 1}]}]}"#;
        assert!(parse(bad_ip).unwrap_err().contains("'pod-a'"));
    }

    #[test]
    fn source_urls_cannot_be_steered() {
        let source = EndpointsSource::new("http://localhost:8001/", "ml", "modelgate").unwrap();
        assert_eq!(
            source.url(),
            "http://localhost:8001/api/v1/namespaces/ml/endpoints/modelgate"
        );
        assert!(EndpointsSource::new("http://h", "ml/../x", "s").is_err());
        assert!(EndpointsSource::new("http://h", "ml", "Svc").is_err());
        assert!(
            EndpointsSource::new("https://kubernetes.default.svc", "ml", "s")
                .unwrap_err()
                .contains("kubectl proxy")
        );
    }

    #[test]
    fn api_errors_keep_their_message() {
        let body = br#"{"kind":"Status","status":"Failure","message":"endpoints \"x\" not found","code":404}"#;
        assert_eq!(api_status_message(body), r#"endpoints "x" not found"#);
        assert_eq!(api_status_message(b"Forbidden"), "Forbidden");
    }
}
