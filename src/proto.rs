//! The TF Serving and TensorFlow protos (see `proto/`), compiled by build.rs.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/protos.rs"));

/// The serialized FileDescriptorSet of every proto above (with imports), for server
/// reflection and for parsing the protobuf text-format config files.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub use tensorflow::serving;
