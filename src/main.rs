//! `modelgate`: parse the flags, set up logging, run the server until a signal.

use modelgate::config::{parse_args, LogFormat};
use std::process::ExitCode;
use std::time::Duration;

/// How long blocking tasks still running when the server has stopped may hold up the exit.
/// Only a version still loading or warming up (the signal came during start-up or a swap)
/// is left by then: nothing will use it, and dropping the runtime would wait for it.
const BLOCKING_TASKS_AT_EXIT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let (flags, warnings) = match parse_args(std::env::args()) {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    modelgate::telemetry::init_logging(flags.log_format == LogFormat::Json);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(modelgate::app::run(flags));
    runtime.shutdown_timeout(BLOCKING_TASKS_AT_EXIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
