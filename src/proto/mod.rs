//! The protos, compiled by build.rs from the repository's `proto/`: TF Serving's and
//! TensorFlow's, and the Open Inference Protocol's (KServe V2, Triton's numbering). Also
//! what every layer needs of them: TensorProto <-> tensor ([`tensor`]), the task answers
//! ([`answers`]) and JSON printing through the descriptors.

pub mod answers;
pub mod tensor;

mod generated {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/protos.rs"));
}
pub use generated::*;

/// The serialized FileDescriptorSet of every proto above (with imports), for server
/// reflection and for parsing the protobuf text-format config files.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub use tensorflow::serving;

/// TF Serving's SignatureDef method names (`signature_constants.h`): what a signature
/// serves.
pub const PREDICT_METHOD_NAME: &str = "tensorflow/serving/predict";
pub const CLASSIFY_METHOD_NAME: &str = "tensorflow/serving/classify";
pub const REGRESS_METHOD_NAME: &str = "tensorflow/serving/regress";

/// The descriptors of [`FILE_DESCRIPTOR_SET`], decoded once.
pub fn descriptor_pool() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        // The descriptor set is produced by build.rs from our own protos: if it does not
        // decode, the binary itself is broken.
        prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("embedded descriptor set decodes")
    })
}

/// An encoded message of type `full_name` (e.g. `tensorflow.serving.Input`) in protobuf's
/// JSON mapping; `None` when the type is unknown or the bytes do not decode.
pub fn to_json(full_name: &str, encoded: &[u8]) -> Option<serde_json::Value> {
    let descriptor = descriptor_pool().get_message_by_name(full_name)?;
    let message = prost_reflect::DynamicMessage::decode(descriptor, encoded).ok()?;
    serde_json::to_value(&message).ok()
}

/// How TF Serving and Triton print a message as JSON for their REST APIs: every field, at
/// its default too, under its proto name, enums by name. TF Serving writes 64-bit integers
/// as strings (the JSON mapping's rule); Triton's model configuration writes them as numbers
/// (`int64_as_strings` false). `None` when the type is unknown or the bytes do not decode.
pub fn to_printed_json(
    full_name: &str,
    encoded: &[u8],
    int64_as_strings: bool,
) -> Option<serde_json::Value> {
    let descriptor = descriptor_pool().get_message_by_name(full_name)?;
    let message = prost_reflect::DynamicMessage::decode(descriptor, encoded).ok()?;
    let options = prost_reflect::SerializeOptions::new()
        .skip_default_fields(false)
        .use_proto_field_name(true)
        .stringify_64_bit_integers(int64_as_strings);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .ok()
}
