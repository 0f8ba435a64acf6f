//! The protocols: TF Serving's gRPC and REST APIs, and what they share (tf.Example inputs
//! and the Classify / Regress / MultiInference tasks).

pub mod examples;
#[cfg(test)]
mod fuzz;
pub mod grpc;
pub mod rest;
pub mod tasks;
