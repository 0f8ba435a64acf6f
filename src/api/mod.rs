//! The protocols: TF Serving's gRPC API and the REST port (probes).

pub mod grpc;
pub mod rest;
