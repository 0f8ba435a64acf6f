//! Property tests ("fuzzing" on the stable toolchain) over the decoders that read client
//! bytes: the REST JSON decoders (`:predict`, `:classify`/`:regress`), the TensorProto
//! decoder and the tf.Example decoder. They must never panic, must only produce tensors
//! whose bytes fit their shape, and encoding then decoding must give back the same bits.
//!
//! The regular test run tries proptest's default 256 cases per property. For a longer run
//! (about 2.5 minutes on 2 cores in the debug profile; add `--release` to go faster once
//! a release build exists):
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --test fuzz
//! ```
//!
//! Failures found this way are kept as plain unit tests (`regressions` below) as well as in
//! proptest's own `proptest-regressions/` files.

use bytes::Bytes;
use modelgate::api::rest::json::{decode_tensors, encode_predict, Format, PredictBody};
use modelgate::api::rest::tasks_json::parse_request;
use modelgate::inference::examples::Examples;
use modelgate::proto::serving::{input, ExampleList, ExampleListWithContext, Input};
use modelgate::proto::tensor::{tensor_from_proto, tensor_to_proto};
use modelgate::proto::tensorflow::{
    feature, tensor_shape_proto, BytesList, DataType, Example, Feature, Features, FloatList,
    Int64List, TensorProto, TensorShapeProto,
};
use modelgate::runtime::padded_size;
use modelgate::signature::{Signature, SignatureKind, TensorSpec};
use modelgate::tensor::limits::DecodeBudget;
use modelgate::tensor::{num_elements, DType, Tensor};
use proptest::prelude::*;
use serde_json::Value;

/// Bounds what one decoded tensor may expand to in these tests.
const MAX_BYTES: usize = 1 << 16;

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn spec(name: &str, dtype: DType, shape: Option<Vec<i64>>) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape,
    }
}

/// Input sets to decode against: one input, two, bytes-capable, every dtype.
fn spec_sets() -> Vec<Vec<TensorSpec>> {
    let mut sets = vec![
        vec![spec("x", DType::F32, None)],
        vec![spec("a", DType::F32, None), spec("b", DType::I64, None)],
        vec![spec("b64", DType::U8, None)],
        vec![
            spec("x_bytes", DType::U8, None),
            spec("y", DType::Bool, None),
        ],
    ];
    sets.extend(DType::ALL.iter().map(|&d| vec![spec("x", d, None)]));
    sets
}

fn check_tensors(specs: &[TensorSpec], tensors: &std::collections::HashMap<String, Tensor>) {
    for (name, tensor) in tensors {
        let spec = specs
            .iter()
            .find(|s| &s.name == name)
            .expect("a named input");
        assert_eq!(tensor.dtype, spec.dtype);
        let elements = num_elements(&tensor.shape).expect("a valid shape");
        assert_eq!(tensor.data.len(), elements * tensor.dtype.size());
    }
}

/// Any JSON value, biased toward what the decoders look for.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-300i64..300).prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(Value::from),
        "[A-Za-z0-9+/=!]{0,12}".prop_map(Value::String),
        "[A-Za-z0-9+/]{0,12}".prop_map(|s| serde_json::json!({ "b64": s })),
    ];
    leaf.prop_recursive(5, 96, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("a|b|x|y|b64|x_bytes|ids|z", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Element bytes made JSON-safe: JSON has no NaN or infinity to read back, and a bool is
/// 0 or 1.
fn sanitize(dtype: DType, mut data: Vec<u8>) -> Vec<u8> {
    let size = dtype.size();
    for element in data.chunks_exact_mut(size) {
        let finite = match dtype {
            DType::F32 => f32::from_le_bytes(element.try_into().unwrap_or_default()).is_finite(),
            DType::F64 => f64::from_le_bytes(element.try_into().unwrap_or_default()).is_finite(),
            DType::F16 => half::f16::from_le_bytes([element[0], element[1]]).is_finite(),
            DType::BF16 => half::bf16::from_le_bytes([element[0], element[1]]).is_finite(),
            DType::Bool => {
                element[0] %= 2;
                true
            }
            _ => true,
        };
        if !finite {
            element.fill(0);
        }
    }
    data
}

/// A tensor JSON can carry back: no dimension is 0 except possibly the last (an empty
/// list cannot say what its elements' shape would have been).
fn json_tensor(min_rank: usize) -> impl Strategy<Value = Tensor> {
    (
        dtype(),
        prop::collection::vec(1i64..4, min_rank..4),
        0..2usize,
    )
        .prop_flat_map(|(dtype, mut shape, empty_last)| {
            if empty_last == 1 && shape.len() >= 2 {
                *shape.last_mut().unwrap_or(&mut 0) = 0;
            }
            let len = num_elements(&shape).unwrap_or(0) * dtype.size();
            prop::collection::vec(any::<u8>(), len).prop_map(move |data| {
                Tensor::new(dtype, shape.clone(), Bytes::from(sanitize(dtype, data))).unwrap()
            })
        })
}

fn tensor_proto() -> impl Strategy<Value = TensorProto> {
    let dtype = prop_oneof![
        prop::sample::select(vec![
            DataType::DtFloat,
            DataType::DtDouble,
            DataType::DtInt32,
            DataType::DtUint8,
            DataType::DtInt16,
            DataType::DtInt8,
            DataType::DtInt64,
            DataType::DtBool,
            DataType::DtHalf,
            DataType::DtBfloat16,
            DataType::DtString,
        ])
        .prop_map(|d| d as i32),
        any::<i32>(),
    ];
    let shape = (
        prop::collection::vec(prop_oneof![-2i64..6, any::<i64>()], 0..4),
        any::<bool>(),
    )
        .prop_map(|(dims, unknown_rank)| TensorShapeProto {
            dim: dims
                .into_iter()
                .map(|size| tensor_shape_proto::Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank,
        });
    (
        dtype,
        prop::option::of(shape),
        prop::collection::vec(any::<u8>(), 0..48),
        prop::collection::vec(any::<f32>(), 0..6),
        prop::collection::vec(any::<i32>(), 0..6),
        prop::collection::vec(any::<i64>(), 0..6),
        prop::collection::vec(any::<bool>(), 0..6),
        prop::collection::vec(any::<f64>(), 0..6),
    )
        .prop_map(
            |(dtype, shape, content, floats, ints, int64s, bools, doubles)| TensorProto {
                dtype,
                tensor_shape: shape,
                tensor_content: Bytes::from(content),
                float_val: floats,
                int_val: ints.clone(),
                half_val: ints,
                int64_val: int64s,
                bool_val: bools,
                double_val: doubles,
                ..Default::default()
            },
        )
}

fn example() -> impl Strategy<Value = Example> {
    let feature = prop_oneof![
        prop::collection::vec(any::<f32>(), 0..7)
            .prop_map(|value| Some(feature::Kind::FloatList(FloatList { value }))),
        prop::collection::vec(prop_oneof![-3i64..300, any::<i64>()], 0..7)
            .prop_map(|value| Some(feature::Kind::Int64List(Int64List { value }))),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..5), 0..3)
            .prop_map(|value| Some(feature::Kind::BytesList(BytesList { value }))),
        Just(None),
    ]
    .prop_map(|kind| Feature { kind });
    prop::collection::hash_map("x|ids|img|y", feature, 0..4).prop_map(|feature| Example {
        features: Some(Features { feature }),
    })
}

fn signature(inputs: Vec<TensorSpec>) -> Signature {
    Signature {
        method_name: String::new(),
        kind: SignatureKind::Predict,
        method: "forward".into(),
        inputs,
        outputs: Vec::new(),
        classes: None,
    }
}

proptest! {
    #[test]
    fn fuzz_rest_predict_body_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(parsed) = PredictBody::parse(&body) {
            for specs in spec_sets() {
                if let Ok(tensors) = parsed.tensors("s", &signature(specs.clone())) {
                    check_tensors(&specs, &tensors);
                }
            }
        }
        let _ = parse_request(&body, "classify");
    }

    #[test]
    fn fuzz_rest_predict_json_values(value in json_value(), signature_name in prop::option::of("[a-z]{0,3}")) {
        for format in [Format::Row, Format::Columnar] {
            let json = value.to_string();
            for specs in spec_sets() {
                if let Ok(tensors) = decode_tensors(format, &json, "s", &specs) {
                    check_tensors(&specs, &tensors);
                    prop_assert_eq!(tensors.len(), specs.len());
                }
            }
            let key = match format { Format::Row => "instances", Format::Columnar => "inputs" };
            let mut body = serde_json::json!({ key: value.clone() });
            if let Some(name) = &signature_name {
                body["signature_name"] = Value::from(name.clone());
            }
            let text = body.to_string();
            // The first pass only looks at the keys (null counts as absent).
            let parsed = PredictBody::parse(text.as_bytes());
            prop_assert_eq!(parsed.is_ok(), !value.is_null(), "{:?}", parsed);
        }
    }

    #[test]
    fn fuzz_rest_classify_json_values(examples in json_value(), context in prop::option::of(json_value())) {
        let mut body = serde_json::json!({ "examples": examples });
        if let Some(context) = context {
            body["context"] = context;
        }
        let _ = parse_request(body.to_string().as_bytes(), "regress");
    }

    #[test]
    fn fuzz_rest_columnar_round_trip(tensor in json_tensor(0), bytes_name in any::<bool>()) {
        let name = if bytes_name { "x_bytes" } else { "x" };
        let text = encode_predict(Format::Columnar, &[(name.to_string(), tensor.clone())]).unwrap();
        let body: Value = serde_json::from_str(&text).unwrap();
        let json = body["outputs"].to_string();
        let specs = [spec(name, tensor.dtype, None)];
        let decoded = decode_tensors(Format::Columnar, &json, "s", &specs)
            .map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(&decoded[name], &tensor, "{}", text);
    }

    #[test]
    fn fuzz_rest_row_round_trip(a in json_tensor(1), b in json_tensor(1)) {
        // Two outputs with the same batch size: objects per element; one: plain values.
        let mut b = b;
        if b.shape[0] != a.shape[0] {
            b = Tensor::zeros(b.dtype, [vec![a.shape[0]], b.shape[1..].to_vec()].concat()).unwrap();
        }
        for outputs in [vec![("a".to_string(), a.clone())], vec![("a".to_string(), a.clone()), ("b_bytes".to_string(), b.clone())]] {
            let text = encode_predict(Format::Row, &outputs).unwrap();
            let body: Value = serde_json::from_str(&text).unwrap();
            let json = body["predictions"].to_string();
            let specs: Vec<TensorSpec> = outputs.iter().map(|(n, t)| spec(n, t.dtype, None)).collect();
            let decoded = decode_tensors(Format::Row, &json, "s", &specs)
                .map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            for (name, tensor) in &outputs {
                prop_assert_eq!(&decoded[name], tensor, "{}", text);
            }
        }
    }

    #[test]
    fn fuzz_rest_mutated_tensors(tensor in json_tensor(1), path in prop::collection::vec(any::<prop::sample::Index>(), 0..4), replacement in json_value(), row in any::<bool>()) {
        // A valid tensor with one value somewhere replaced: near-misses reach deep into
        // the shape and dtype checks.
        let text = encode_predict(Format::Columnar, &[("x".to_string(), tensor.clone())]).unwrap();
        let mut value: Value = serde_json::from_str(&text).unwrap();
        let mut pointer = String::from("/outputs");
        for index in &path {
            match value.pointer(&pointer) {
                Some(Value::Array(items)) if !items.is_empty() => {
                    pointer.push_str(&format!("/{}", index.index(items.len())));
                }
                _ => break,
            }
        }
        if let Some(at) = value.pointer_mut(&pointer) {
            *at = replacement;
        }
        let json = value["outputs"].to_string();
        let format = if row { Format::Row } else { Format::Columnar };
        for dtype in [tensor.dtype, DType::F32, DType::U8] {
            let specs = [spec("x", dtype, None)];
            if let Ok(tensors) = decode_tensors(format, &json, "s", &specs) {
                check_tensors(&specs, &tensors);
            }
        }
    }

    #[test]
    fn fuzz_float32_text_round_trips(bits in any::<u32>()) {
        let v = f32::from_bits(bits);
        prop_assume!(v.is_finite());
        let mut text = String::new();
        modelgate::api::rest::json::write_f32(&mut text, v).unwrap();
        let decoded = decode_tensors(Format::Columnar, &text, "s", &[spec("x", DType::F32, None)]).unwrap();
        prop_assert_eq!(decoded["x"].to_values::<f32>().unwrap()[0].to_bits(), bits, "{}", text);
    }

    #[test]
    fn fuzz_tensor_proto(proto in tensor_proto()) {
        if let Ok(tensor) = tensor_from_proto("x", &proto, &mut DecodeBudget::new(MAX_BYTES, 0)) {
            let elements = num_elements(&tensor.shape).unwrap();
            prop_assert_eq!(tensor.data.len(), elements * tensor.dtype.size());
            prop_assert!(tensor.data.len() <= MAX_BYTES);
        }
    }

    #[test]
    fn fuzz_tensor_proto_bytes(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        use prost::Message;
        if let Ok(proto) = TensorProto::decode(bytes.as_slice()) {
            if let Ok(tensor) = tensor_from_proto("x", &proto, &mut DecodeBudget::new(MAX_BYTES, 0)) {
                let elements = num_elements(&tensor.shape).unwrap();
                prop_assert_eq!(tensor.data.len(), elements * tensor.dtype.size());
            }
        }
    }

    #[test]
    fn fuzz_tensor_proto_round_trip(tensor in json_tensor(0), as_content in any::<bool>()) {
        let proto = tensor_to_proto(&tensor, as_content);
        prop_assert_eq!(tensor_from_proto("x", &proto, &mut DecodeBudget::unlimited()).unwrap(), tensor);
    }

    #[test]
    fn fuzz_examples(examples in prop::collection::vec(example(), 0..4), context in prop::option::of(example())) {
        let input = Input {
            kind: Some(match context {
                Some(context) => input::Kind::ExampleListWithContext(ExampleListWithContext { examples, context: Some(context) }),
                None => input::Kind::ExampleList(ExampleList { examples }),
            }),
        };
        let Ok(examples) = Examples::from_input(Some(&input)) else { return Ok(()) };
        let specs = [
            spec("x", DType::F32, Some(vec![-1, 3])),
            spec("ids", DType::I64, Some(vec![-1, 2])),
            spec("img", DType::U8, None),
            spec("y", DType::F16, Some(vec![-1, 2, -1])),
            spec("x", DType::Bool, Some(vec![-1])),
            spec("ids", DType::I8, Some(vec![-1, -1])),
        ];
        for spec in &specs {
            if let Ok(tensors) = examples.tensors_for("s", std::slice::from_ref(spec), &mut DecodeBudget::new(MAX_BYTES, 0)) {
                let tensor = &tensors[0];
                prop_assert_eq!(tensor.shape[0] as usize, examples.len());
                let elements = num_elements(&tensor.shape).unwrap();
                prop_assert_eq!(tensor.data.len(), elements * tensor.dtype.size());
            }
        }
    }
}

/// Shapes as an attacker writes them: huge declared dimensions (up to 2^62) beside zeros and
/// ones, so that element counts overflow, or are zero with a huge dimension beside them.
fn hostile_shape() -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(
        prop_oneof![
            Just(0i64),
            Just(1i64),
            1i64..8,
            (40u32..63).prop_map(|bits| 1i64 << bits),
            (40u32..63).prop_map(|bits| (1i64 << bits) - 1),
        ],
        0..4,
    )
}

proptest! {
    /// Marking NaN/Infinity tokens never panics, and leaves a body without them as it was.
    #[test]
    fn fuzz_mark_nonfinite(body in prop::collection::vec(prop::sample::select(b"[]{},:\" \\NaIfinty-1".to_vec()), 0..64)) {
        let marked = modelgate::api::rest::json::mark_nonfinite(&body);
        if !body.windows(3).any(|w| w == b"NaN") && !body.windows(8).any(|w| w == b"Infinity") {
            prop_assert_eq!(marked.as_ref(), body.as_slice());
        }
        if let Ok(parsed) = PredictBody::parse(&marked) {
            let specs = vec![spec("x", DType::F32, None)];
            if let Ok(tensors) = parsed.tensors("s", &signature(specs.clone())) {
                check_tensors(&specs, &tensors);
            }
        }
    }

    /// Huge declared shapes with a payload of one broadcast value or none: the decoder
    /// refuses before allocating, or builds at most the budget.
    #[test]
    fn fuzz_tensor_proto_hostile_shapes(
        shape in hostile_shape(),
        dtype in prop::sample::select(vec![DataType::DtFloat, DataType::DtInt8, DataType::DtUint8, DataType::DtInt64, DataType::DtHalf]),
        broadcast in any::<bool>(),
    ) {
        let proto = TensorProto {
            dtype: dtype as i32,
            tensor_shape: Some(modelgate::proto::tensor::shape_proto(Some(&shape))),
            float_val: if broadcast { vec![1.0] } else { Vec::new() },
            int_val: if broadcast { vec![1] } else { Vec::new() },
            int64_val: if broadcast { vec![1] } else { Vec::new() },
            half_val: if broadcast { vec![1] } else { Vec::new() },
            ..Default::default()
        };
        if let Ok(tensor) = tensor_from_proto("x", &proto, &mut DecodeBudget::new(MAX_BYTES, 0)) {
            prop_assert!(tensor.data.len() <= MAX_BYTES);
            prop_assert_eq!(tensor.data.len(), num_elements(&tensor.shape).unwrap() * tensor.dtype.size());
        }
    }

    /// Many empty examples and a context: whatever their counts, the tensors built fit the
    /// budget (the context is charged once per example that takes it).
    #[test]
    fn fuzz_examples_context_amplification(
        empty in 1usize..5_000,
        context_values in 0usize..2_000,
    ) {
        let input = Input {
            kind: Some(input::Kind::ExampleListWithContext(ExampleListWithContext {
                examples: vec![Example::default(); empty],
                context: Some(Example {
                    features: Some(Features {
                        feature: [("x".to_string(), Feature {
                            kind: Some(feature::Kind::FloatList(FloatList { value: vec![0.5; context_values] })),
                        })].into(),
                    }),
                }),
            })),
        };
        let examples = Examples::from_input(Some(&input)).unwrap();
        let mut budget = DecodeBudget::new(MAX_BYTES, 0);
        match examples.tensors_for("s", &[spec("x", DType::F64, Some(vec![-1, -1]))], &mut budget) {
            Ok(tensors) => prop_assert!(tensors[0].data.len() <= MAX_BYTES),
            Err(_) => prop_assert!(empty * context_values * 8 > MAX_BYTES || context_values == 0),
        }
    }

    /// Concatenating and padding tensors of any shape, zero rows and huge dims included,
    /// never panics and never allocates past what its rows hold.
    #[test]
    fn fuzz_concat_and_pad_hostile_shapes(
        rest in hostile_shape(),
        rows in prop::collection::vec(0i64..3, 1..4),
        allowed in prop::collection::vec(1usize..64, 0..3),
    ) {
        let tensors: Vec<Tensor> = rows
            .iter()
            .filter_map(|&r| {
                let shape: Vec<i64> = std::iter::once(r).chain(rest.iter().copied()).collect();
                let bytes = modelgate::tensor::byte_size(DType::F32, &shape).ok().filter(|&b| b <= MAX_BYTES)?;
                Tensor::new(DType::F32, shape, Bytes::from(vec![0u8; bytes])).ok()
            })
            .collect();
        let parts: Vec<&Tensor> = tensors.iter().collect();
        if parts.is_empty() {
            return Ok(());
        }
        let mut allowed = allowed;
        allowed.sort_unstable();
        allowed.dedup();
        let total: usize = parts.iter().map(|t| t.rows().unwrap_or(0)).sum();
        let padded = padded_size(&allowed, total);
        if let Ok(joined) = Tensor::concat_rows_padded(&parts, padded) {
            prop_assert_eq!(joined.rows(), Some(padded));
            prop_assert!(joined.data.len() <= MAX_BYTES * 64 * parts.len());
            for start in 0..padded {
                prop_assert!(joined.slice_rows(start, 1).is_some());
            }
        }
    }
}

/// Inputs that once broke (or could break) a decoder, kept as plain tests.
mod regressions {
    use super::*;

    /// Nesting deeper than serde_json's recursion limit is an error, not a stack overflow.
    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        // The first pass skips values without recursing, so it may accept the nesting; the
        // second pass, which recurses, stops at the limit.
        let body = format!("{{\"instances\": {deep}}}");
        let parsed = PredictBody::parse(body.as_bytes()).unwrap();
        let signature = signature(vec![spec("x", DType::F32, None)]);
        let err = parsed.tensors("s", &signature).unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
        let specs = [spec("x", DType::F32, None)];
        assert!(decode_tensors(Format::Columnar, &deep, "s", &specs).is_err());
        let body = format!("{{\"examples\": [{{\"x\": {deep}}}]}}");
        assert!(parse_request(body.as_bytes(), "classify").is_err());
    }

    /// A large first example followed by many one-value examples used to reserve
    /// (first size x example count) bytes before the second example was checked.
    #[test]
    fn examples_do_not_reserve_from_the_first_one() {
        let feature = |n: usize| Feature {
            kind: Some(feature::Kind::FloatList(FloatList {
                value: vec![1.0; n],
            })),
        };
        let example = |n: usize| Example {
            features: Some(Features {
                feature: [("x".to_string(), feature(n))].into(),
            }),
        };
        let mut examples = vec![example(1 << 20)];
        examples.extend((0..50_000).map(|_| example(1)));
        let input = Input {
            kind: Some(input::Kind::ExampleList(ExampleList { examples })),
        };
        let examples = Examples::from_input(Some(&input)).unwrap();
        let err = examples
            .tensors_for(
                "s",
                &[spec("x", DType::F64, Some(vec![-1, -1]))],
                &mut DecodeBudget::unlimited(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("example 1"), "{err}");
    }

    /// Empty innermost lists and empty base64 values keep their dimension.
    #[test]
    fn empty_innermost_dimensions() {
        let specs = [spec("x", DType::U8, None)];
        let t = decode_tensors(Format::Row, r#"[{"b64": ""}, {"b64": ""}]"#, "s", &specs).unwrap();
        assert_eq!(t["x"].shape, vec![2, 0]);
        let t = decode_tensors(Format::Row, "[[], []]", "s", &specs).unwrap();
        assert_eq!(t["x"].shape, vec![2, 0]);
        let err = decode_tensors(
            Format::Row,
            r#"[{"b64": ""}, {"b64": "AA=="}]"#,
            "s",
            &specs,
        );
        assert!(err.is_err());
    }
}
