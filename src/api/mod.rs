//! The protocols: TF Serving's gRPC API, the REST port (probes), and the admin API on the
//! REST port.

pub mod admin;
pub mod grpc;
pub mod rest;
