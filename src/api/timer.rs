//! The API edge's view of one request: when it started, which method and protocol it
//! called, and, once answered, one record of it in the metrics, the log and the request log.

use crate::error::Error;
use crate::inference::Inference;
use crate::request_log;
use crate::telemetry::{self, Api, Protocol, RequestRecord};
use std::time::Instant;

/// Measures one request and records it once, in [`RequestTimer::finish`].
#[must_use = "a request timer records nothing until finish() is called"]
pub struct RequestTimer {
    api: Api,
    protocol: Protocol,
    started: Instant,
}

impl RequestTimer {
    /// Starts timing, and names the request's method and protocol to its request log scope.
    pub fn start(api: Api, protocol: Protocol) -> RequestTimer {
        request_log::begin(api, protocol);
        RequestTimer {
            api,
            protocol,
            started: Instant::now(),
        }
    }

    /// Records the request: `requested` is the model name the client sent; `outcome` the
    /// version that answered (`None` for calls no version answers) or the error. The
    /// metrics label of a failed request is its model's name only when the server knows
    /// that model, so that labels never take arbitrary client text. An inference counts in
    /// its version's statistics, a failed one too once it had resolved a version.
    pub fn finish(
        self,
        inference: &Inference,
        requested: &str,
        outcome: Result<Option<i64>, &Error>,
    ) {
        let elapsed = self.started.elapsed();
        let (model, version) = match outcome {
            Ok(version) => (requested, version),
            Err(_) => (inference.metrics_label(requested), None),
        };
        let ran_on = match outcome {
            _ if !self.api.runs_model() => None,
            Ok(version) => version,
            Err(_) => request_log::ran_on(),
        };
        let outcome = outcome.map(|_| ());
        request_log::end(model, elapsed, outcome);
        telemetry::record_request(
            RequestRecord {
                api: self.api,
                protocol: self.protocol,
                model,
                requested,
                version,
                ran_on,
                elapsed,
            },
            outcome,
        );
    }
}
