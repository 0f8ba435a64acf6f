//! Environment variables, each named once here. The S3 ones keep the names of TF Serving's
//! S3 file system, so a Deployment written for `tensorflow/serving` runs unchanged; the AWS
//! ones (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_PROFILE`, `AWS_WEB_IDENTITY_TOKEN_FILE`, ...) are read by the AWS SDK's default
//! chain itself and never by modelgate, so their values never pass through its logs.

/// A custom S3 endpoint (`http://127.0.0.1:9000`, `minio:9000`); turns on path-style
/// addressing.
pub const S3_ENDPOINT: &str = "S3_ENDPOINT";
/// `0` talks plain HTTP to an `S3_ENDPOINT` given without a scheme (default `1`).
pub const S3_USE_HTTPS: &str = "S3_USE_HTTPS";
/// `0` accepts any TLS certificate from the S3 endpoint (default `1`).
pub const S3_VERIFY_SSL: &str = "S3_VERIFY_SSL";

/// How to reach S3, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Env {
    /// The endpoint URL, with its scheme settled by `S3_USE_HTTPS`; `None` = AWS's own.
    pub endpoint: Option<String>,
    pub use_https: bool,
    pub verify_ssl: bool,
    /// What was wrong with the variables (logged once the S3 client is built).
    pub warnings: Vec<String>,
}

impl S3Env {
    /// Reads the variables of the process environment.
    pub fn from_env() -> S3Env {
        S3Env::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> S3Env {
        let mut warnings = Vec::new();
        let mut flag = |name: &str| match lookup(name).as_deref().map(str::trim) {
            None | Some("") => true,
            Some("1") | Some("true") | Some("TRUE") | Some("True") => true,
            Some("0") | Some("false") | Some("FALSE") | Some("False") => false,
            Some(other) => {
                warnings.push(format!("{name}={other} is not 0 or 1; using 1"));
                true
            }
        };
        let use_https = flag(S3_USE_HTTPS);
        let verify_ssl = flag(S3_VERIFY_SSL);
        let endpoint = lookup(S3_ENDPOINT)
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e
                } else if use_https {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            });
        if endpoint.is_none() && !use_https {
            warnings.push(format!(
                "{S3_USE_HTTPS}=0 applies to an {S3_ENDPOINT} only; AWS's own endpoints are reached over HTTPS"
            ));
        }
        S3Env {
            endpoint,
            use_https,
            verify_ssl,
            warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> S3Env {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        S3Env::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn endpoint_scheme_follows_s3_use_https() {
        assert_eq!(env(&[]).endpoint, None);
        assert!(env(&[]).verify_ssl);
        assert_eq!(
            env(&[(S3_ENDPOINT, "minio:9000")]).endpoint.as_deref(),
            Some("https://minio:9000")
        );
        assert_eq!(
            env(&[(S3_ENDPOINT, "minio:9000"), (S3_USE_HTTPS, "0")])
                .endpoint
                .as_deref(),
            Some("http://minio:9000")
        );
        // An explicit scheme wins.
        assert_eq!(
            env(&[(S3_ENDPOINT, "http://127.0.0.1:9000/"), (S3_USE_HTTPS, "1")])
                .endpoint
                .as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert!(!env(&[(S3_VERIFY_SSL, "0")]).verify_ssl);
        let odd = env(&[(S3_VERIFY_SSL, "maybe")]);
        assert!(odd.verify_ssl);
        assert_eq!(odd.warnings.len(), 1);
    }
}
