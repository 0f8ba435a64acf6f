//! The protocols: TF Serving's gRPC and REST APIs, what they share (tf.Example inputs and
//! the Classify / Regress / MultiInference tasks), and the admin API on the REST port.

pub mod admin;
pub mod examples;
#[cfg(test)]
mod fuzz;
pub mod grpc;
pub mod rest;
pub mod serve;
pub mod tasks;
