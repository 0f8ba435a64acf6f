//! The paths of TF Serving's REST API, parsed as TF Serving's own patterns do
//! (`model_servers/http_rest_api_util.cc`), case-insensitively:
//!
//! ```text
//! POST /v1/models/{m}[/versions/{v}|/labels/{l}]:(predict|classify|regress)
//! GET  /v1/models/{m}[/versions/{v}|/labels/{l}][/metadata]
//! ```
//!
//! Model names and labels are percent-decoded; they cannot hold `/` or `:`.

use crate::error::Error;
use crate::registry::VersionSelector;
use std::fmt;

/// What a `/v1/` request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub model: String,
    pub version: VersionSelector,
    pub call: Call,
}

/// The call a route names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Status,
    Metadata,
    Predict,
    Classify,
    Regress,
}

/// The HTTP methods the API answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Post => "POST",
        })
    }
}

/// Whether `path` belongs to the TF Serving API (`/v1/...`, any case).
pub fn is_api_path(path: &str) -> bool {
    strip_prefix_ignore_case(path, "/v1/").is_some()
}

/// Parses a `/v1/` path; anything that is not one of the API's forms is INVALID_ARGUMENT
/// ("Malformed request"), as in TF Serving.
pub fn parse(method: Method, path: &str) -> Result<Route, Error> {
    let malformed = || Error::InvalidArgument(format!("Malformed request: {method} {path}"));
    let rest = strip_prefix_ignore_case(path, "/v1/models").ok_or_else(malformed)?;
    if rest.is_empty() || rest == "/" {
        return match method {
            Method::Get => Err(Error::InvalidArgument(
                "Missing model name in request.".into(),
            )),
            Method::Post => Err(malformed()),
        };
    }
    let rest = rest.strip_prefix('/').ok_or_else(malformed)?;
    let (raw_model, mut rest) = split_segment(rest);
    if raw_model.is_empty() {
        return Err(malformed());
    }
    let model = decode(raw_model, "model name")?;

    let mut version = VersionSelector::Latest;
    if let Some(after) = strip_prefix_ignore_case(rest, "/versions/") {
        let digits_end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        let digits = &after[..digits_end];
        if digits.is_empty() {
            return Err(malformed());
        }
        let number = digits.parse::<i64>().map_err(|_| {
            Error::InvalidArgument(format!("Failed to convert version: {digits} to numeric."))
        })?;
        version = VersionSelector::Number(number);
        rest = &after[digits_end..];
    } else if let Some(after) = strip_prefix_ignore_case(rest, "/labels/") {
        let (raw_label, after) = split_segment(after);
        if raw_label.is_empty() {
            return Err(malformed());
        }
        version = VersionSelector::Label(decode(raw_label, "model version label")?);
        rest = after;
    }

    let call = match method {
        Method::Post => {
            let verb = rest.strip_prefix(':').ok_or_else(malformed)?;
            match verb.to_ascii_lowercase().as_str() {
                "predict" => Call::Predict,
                "classify" => Call::Classify,
                "regress" => Call::Regress,
                _ => return Err(malformed()),
            }
        }
        Method::Get => {
            if rest.is_empty() {
                Call::Status
            } else if rest.eq_ignore_ascii_case("/metadata") {
                Call::Metadata
            } else {
                return Err(malformed());
            }
        }
    };
    Ok(Route {
        model,
        version,
        call,
    })
}

/// Splits off the text up to the next `/` or `:`.
fn split_segment(text: &str) -> (&str, &str) {
    let end = text.find(['/', ':']).unwrap_or(text.len());
    text.split_at(end)
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn decode(raw: &str, what: &str) -> Result<String, Error> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Error::InvalidArgument(format!("Failed to decode {what}: {raw}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, path: &str) -> Route {
        parse(method, path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn every_form_parses() {
        let r = route(Method::Post, "/v1/models/mlp:predict");
        assert_eq!(
            r,
            Route {
                model: "mlp".into(),
                version: VersionSelector::Latest,
                call: Call::Predict
            }
        );
        let r = route(Method::Post, "/v1/models/mlp/versions/12:classify");
        assert_eq!(
            (r.version, r.call),
            (VersionSelector::Number(12), Call::Classify)
        );
        let r = route(Method::Post, "/V1/Models/mlp/LABELS/can%20ary:REGRESS");
        assert_eq!(
            (r.model.as_str(), r.version, r.call),
            (
                "mlp",
                VersionSelector::Label("can ary".into()),
                Call::Regress
            )
        );
        let r = route(Method::Get, "/v1/models/my%2Fmodel");
        assert_eq!((r.model.as_str(), r.call), ("my/model", Call::Status));
        let r = route(Method::Get, "/v1/models/mlp/versions/2/metadata");
        assert_eq!(
            (r.version, r.call),
            (VersionSelector::Number(2), Call::Metadata)
        );
        let r = route(Method::Get, "/v1/models/mlp/labels/stable");
        assert_eq!(
            (r.version, r.call),
            (VersionSelector::Label("stable".into()), Call::Status)
        );
    }

    #[test]
    fn malformed_paths_are_invalid_argument() {
        for (method, path) in [
            (Method::Post, "/v1/models/mlp"),
            (Method::Post, "/v1/models/mlp:explain"),
            (Method::Post, "/v1/models/:predict"),
            (Method::Post, "/v1/models/mlp/versions/x:predict"),
            (Method::Post, "/v1/models/mlp/versions/:predict"),
            (Method::Post, "/v1/models/mlp/labels/:predict"),
            (Method::Get, "/v1/models/mlp:predict"),
            (Method::Get, "/v1/models/mlp/other"),
            (Method::Get, "/v1/other"),
            (Method::Post, "/v1/models"),
        ] {
            let err = parse(method, path).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.starts_with("Malformed request")),
                "{method} {path}: {err}"
            );
        }
        let err = parse(Method::Get, "/v1/models").unwrap_err();
        assert_eq!(err.to_string(), "Missing model name in request.");
        let err = parse(Method::Get, "/v1/models/m/versions/99999999999999999999").unwrap_err();
        assert!(
            err.to_string().contains("Failed to convert version"),
            "{err}"
        );
        let err = parse(Method::Get, "/v1/models/%FF").unwrap_err();
        assert!(
            err.to_string().contains("Failed to decode model name"),
            "{err}"
        );
        assert!(is_api_path("/V1/models"));
        assert!(!is_api_path("/v1"));
    }

    proptest::proptest! {
        #[test]
        fn fuzz_rest_paths(path in "(/[vV]1(/[mM]odels(/[a-zé%0-9:/]{0,12})?)?)?[a-zé%0-9:/]{0,8}") {
            for method in [Method::Get, Method::Post] {
                if let Ok(route) = parse(method, &path) {
                    proptest::prop_assert!(!route.model.is_empty());
                }
            }
        }
    }
}
