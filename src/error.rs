//! The serving error: what a request can fail with, and its one mapping to gRPC codes and
//! HTTP statuses (TF Serving's table, `model_servers/http_server.cc`).

use tonic::Code;

/// Why a request failed. `code()` is the truth; the HTTP status and the short `kind()`
/// label used by logs and metrics are derived from it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Unknown model, version or version label.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong: missing or extra input, wrong dtype or shape, bad payload.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is well formed but cannot apply to this model (e.g. unknown signature).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The server cannot take the request now (full queue, draining); clients may retry.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed before it could be answered.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The client went away.
    #[error("{0}")]
    Cancelled(String),
    /// The call needs a credential the request did not carry (the admin token).
    #[error("{0}")]
    Unauthenticated(String),
    /// The call exists in TF Serving's or the V2 protocol's API but this server does not
    /// do it (e.g. V2 shared memory, streaming).
    #[error("{0}")]
    Unimplemented(String),
    /// The model failed (libtorch threw) or the server broke an invariant.
    #[error("{0}")]
    Internal(String),
    /// The server lacked the memory for this request (e.g. CUDA out of memory); it keeps
    /// serving, and a smaller or later request may succeed.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A REST request body over the configured limit. Its gRPC code is RESOURCE_EXHAUSTED,
    /// what gRPC answers for a message over its size limit; over HTTP it is 413.
    #[error("{0}")]
    PayloadTooLarge(String),
}

impl Error {
    /// The gRPC status code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Cancelled(_) => Code::Cancelled,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Internal(_) => Code::Internal,
            Error::ResourceExhausted(_) | Error::PayloadTooLarge(_) => Code::ResourceExhausted,
        }
    }

    /// The HTTP status TF Serving's REST API answers with for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            // HTTP has a status of its own for this; TF Serving's table has no entry.
            Error::PayloadTooLarge(_) => 413,
            _ => http_status_for(self.code()),
        }
    }

    /// A short, stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        code_label(self.code())
    }

    /// The same error, its message followed by ` (note)`.
    pub fn noted(self, note: &str) -> Error {
        let noted = |message: String| format!("{message} ({note})");
        match self {
            Error::NotFound(m) => Error::NotFound(noted(m)),
            Error::InvalidArgument(m) => Error::InvalidArgument(noted(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(noted(m)),
            Error::Unavailable(m) => Error::Unavailable(noted(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(noted(m)),
            Error::Cancelled(m) => Error::Cancelled(noted(m)),
            Error::Unauthenticated(m) => Error::Unauthenticated(noted(m)),
            Error::Unimplemented(m) => Error::Unimplemented(noted(m)),
            Error::Internal(m) => Error::Internal(noted(m)),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(noted(m)),
            Error::PayloadTooLarge(m) => Error::PayloadTooLarge(noted(m)),
        }
    }
}

/// An error and its sources on one line, `outer: inner: ...`, skipping a source whose text
/// the outer ones already carry. (Client libraries' outermost message, e.g. hyper's "client
/// error (Connect)", rarely says what went wrong; their own context dumps are too long for
/// a log line or a status message.)
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// TF Serving's mapping of a gRPC code to an HTTP status (`ToHTTPStatusCode`).
pub fn http_status_for(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::ResourceExhausted => 429,
        Code::Cancelled => 499,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

/// The snake_case name of a gRPC code, as a metrics label.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        tonic::Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_follow_tf_serving() {
        assert_eq!(Error::NotFound("m".into()).http_status(), 404);
        assert_eq!(Error::InvalidArgument("x".into()).http_status(), 400);
        assert_eq!(Error::FailedPrecondition("s".into()).http_status(), 400);
        assert_eq!(Error::Unavailable("q".into()).http_status(), 503);
        assert_eq!(Error::DeadlineExceeded("d".into()).http_status(), 504);
        assert_eq!(Error::Cancelled("c".into()).http_status(), 499);
        assert_eq!(Error::Internal("i".into()).http_status(), 500);
        assert_eq!(Error::PayloadTooLarge("b".into()).http_status(), 413);
        assert_eq!(
            Error::PayloadTooLarge("b".into()).code(),
            Code::ResourceExhausted
        );
        assert_eq!(http_status_for(Code::ResourceExhausted), 429);
        assert_eq!(http_status_for(Code::Aborted), 409);
    }

    #[test]
    fn a_note_keeps_the_code() {
        let noted = Error::ResourceExhausted("no room".into()).noted("retrying");
        assert_eq!(noted, Error::ResourceExhausted("no room (retrying)".into()));
    }

    #[test]
    fn status_carries_code_and_message() {
        let status: tonic::Status = Error::NotFound("model 'x' not found".into()).into();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "model 'x' not found");
    }
}
