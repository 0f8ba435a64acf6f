//! Errors as TF Serving's REST API answers them: `{"error": "<message>"}` with the HTTP
//! status of the error's gRPC code (the table lives in `crate::error`).

use crate::error::Error;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// A JSON answer with `status`.
pub fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The answer to a failed request.
pub fn error_response(error: &Error) -> Response {
    let status =
        StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        status,
        serde_json::json!({ "error": error.to_string() }).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_mapped_status() {
        let response = error_response(&Error::NotFound("model 'x' is not served here".into()));
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let response = error_response(&Error::PayloadTooLarge("big".into()));
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
