//! `modelgate`: parse the flags, set up logging, run the server until a signal.

use modelgate::config::{parse_args, LogFormat};
use std::process::ExitCode;

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
    match runtime.block_on(modelgate::app::run(flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
