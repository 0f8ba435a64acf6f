//! SignatureDef: a version's signatures as GetModelMetadata answers them.

use crate::proto::serving::SignatureDefMap;
use crate::proto::tensor::{dtype_to_proto, shape_proto};
use crate::proto::tensorflow::{tensor_info, SignatureDef, TensorInfo};
use crate::signature::{SignatureMap, TensorSpec};

/// The SignatureDefMap that GetModelMetadata returns for a model version.
pub fn signature_def_map(signatures: &SignatureMap) -> SignatureDefMap {
    let infos = |specs: &[TensorSpec]| {
        specs
            .iter()
            .map(|spec| {
                (
                    spec.name.clone(),
                    TensorInfo {
                        dtype: dtype_to_proto(spec.dtype) as i32,
                        tensor_shape: Some(shape_proto(spec.shape.as_deref())),
                        encoding: Some(tensor_info::Encoding::Name(spec.name.clone())),
                    },
                )
            })
            .collect()
    };
    SignatureDefMap {
        signature_def: signatures
            .signatures
            .iter()
            .map(|(name, sig)| {
                (
                    name.clone(),
                    SignatureDef {
                        inputs: infos(&sig.inputs),
                        outputs: infos(&sig.outputs),
                        method_name: sig.method_name.clone(),
                        ..Default::default()
                    },
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::tensor::dims;
    use crate::proto::tensorflow::DataType;

    #[test]
    fn signature_defs_carry_names_dtypes_and_shapes() {
        let map = SignatureMap::from_json(
            r#"{"signatures": {"serving_default": {"inputs": [{"name": "x", "dtype": "DT_FLOAT", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "dtype": "DT_INT64"}]}}}"#,
        )
        .unwrap();
        let defs = signature_def_map(&map);
        let def = &defs.signature_def["serving_default"];
        assert_eq!(def.method_name, "tensorflow/serving/predict");
        let x = &def.inputs["x"];
        assert_eq!(x.dtype, DataType::DtFloat as i32);
        assert_eq!(dims(x.tensor_shape.as_ref().unwrap()), vec![-1, 4]);
        assert!(def.outputs["y"].tensor_shape.as_ref().unwrap().unknown_rank);
    }
}
