//! modelgate: a TensorFlow Serving compatible server for TorchScript models.
//!
//! Requests flow one way: `api` (gRPC, REST) decodes bytes into [`tensor::Tensor`]s, the
//! [`inference`] facade resolves the model version in the [`registry`] and checks the
//! signature, the [`runtime`] runs libtorch on worker threads, and the answer flows back.
//! The registry learns which versions exist from [`storage`]; `api` never touches storage
//! and `runtime` knows nothing of protocols. [`request_log`] records sampled requests and
//! their answers for the models whose config asks for it.

pub mod api;
pub mod app;
pub mod batching;
pub mod config;
pub mod error;
pub mod http_client;
pub mod inference;
pub mod proto;
pub mod registry;
pub mod request_log;
pub mod runtime;
pub mod signature;
pub mod storage;
pub mod telemetry;
pub mod tensor;
pub mod tfrecord;
