//! The tf.Example inputs of Classify, Regress and MultiInference, turned into the tensors a
//! classify or regress signature takes: each input is read from the feature of the same
//! name, one row per example, so the examples of a request make one batch.

use crate::error::Error;
use crate::proto::serving::{input, Input};
use crate::proto::tensorflow::{feature, Example, Feature};
use crate::signature::TensorSpec;
use crate::tensor::limits::DecodeBudget;
use crate::tensor::{DType, ElementError, ElementWriter, Tensor};

/// The examples of one request. A feature of an example hides the context's feature of the
/// same name (TF Serving merges the context into each example, the example's own value last).
#[derive(Clone, Copy, Debug)]
pub struct Examples<'a> {
    examples: &'a [Example],
    context: Option<&'a Example>,
}

impl<'a> Examples<'a> {
    /// The examples of a request's `input`; none at all is INVALID_ARGUMENT.
    pub fn from_input(input: Option<&'a Input>) -> Result<Examples<'a>, Error> {
        let examples = match input.and_then(|i| i.kind.as_ref()) {
            Some(input::Kind::ExampleList(list)) => Examples {
                examples: &list.examples,
                context: None,
            },
            Some(input::Kind::ExampleListWithContext(list)) => Examples {
                examples: &list.examples,
                context: list.context.as_ref(),
            },
            None => {
                return Err(Error::InvalidArgument(
                    "the request has no input: send input.example_list or \
                     input.example_list_with_context"
                        .into(),
                ))
            }
        };
        if examples.examples.is_empty() {
            return Err(Error::InvalidArgument(
                "the request's input holds no examples".into(),
            ));
        }
        Ok(examples)
    }

    /// How many examples, i.e. the batch size.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    fn feature(&self, index: usize, name: &str) -> Option<&'a Feature> {
        let own = |example: &'a Example| example.features.as_ref()?.feature.get(name);
        own(&self.examples[index]).or_else(|| self.context.and_then(own))
    }

    /// The tensors of `specs` (a signature's inputs, in order), each of shape
    /// `[examples, per-example shape...]`. `signature` names the signature in errors. Each
    /// tensor's bytes are charged to `budget` before they are allocated: the context's
    /// features are copied into every example, so a small context and many empty examples
    /// could otherwise ask for their product.
    pub fn tensors_for(
        &self,
        signature: &str,
        specs: &[TensorSpec],
        budget: &mut DecodeBudget,
    ) -> Result<Vec<Tensor>, Error> {
        specs
            .iter()
            .map(|spec| self.tensor_for(signature, spec, budget))
            .collect()
    }

    fn tensor_for(
        &self,
        signature: &str,
        spec: &TensorSpec,
        budget: &mut DecodeBudget,
    ) -> Result<Tensor, Error> {
        let mut row_shape = RowShape::of(signature, spec)?;
        let count = self.len();
        // Sized from the values actually sent (a context's once per example that uses it),
        // not from the first example times the count: a large first example followed by
        // many tiny ones must not reserve their product.
        let present = (0..count)
            .filter_map(|index| self.feature(index, &spec.name))
            .try_fold(0usize, |sum, feature| {
                sum.checked_add(Values::of(feature).len())
            })
            .and_then(|elements| elements.checked_mul(spec.dtype.size()));
        budget.charge(
            &format!("input '{}' from {count} example(s)", spec.name),
            present.unwrap_or(usize::MAX),
        )?;
        let elements = present.unwrap_or(0) / spec.dtype.size();
        let mut data = ElementWriter::new(spec.dtype, elements);
        for index in 0..count {
            let feature = self.feature(index, &spec.name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "example {index} has no feature '{}' (an input of signature '{signature}')",
                    spec.name
                ))
            })?;
            let values = Values::of(feature);
            let invalid = |message: String| {
                Error::InvalidArgument(format!(
                    "example {index}, feature '{}': {message}",
                    spec.name
                ))
            };
            row_shape.accept(values.len()).map_err(invalid)?;
            values.write(&mut data).map_err(invalid)?;
        }
        let mut shape = Vec::with_capacity(row_shape.dims.len() + 1);
        shape.push(count as i64);
        shape.extend(row_shape.dims.iter().map(|d| d.unwrap_or(0)));
        data.into_tensor(shape)
            .map_err(|e| Error::InvalidArgument(format!("input '{}': {e}", spec.name)))
    }
}

/// The shape of one example's share of an input: the signature's shape without the batch
/// dimension. At most one dimension may be free; it is read off the first example.
struct RowShape {
    dims: Vec<Option<i64>>,
    spec: String,
}

impl RowShape {
    fn of(signature: &str, spec: &TensorSpec) -> Result<RowShape, Error> {
        let dims = match spec.shape.as_deref() {
            // Unknown rank: one list of values per example.
            None => vec![None],
            Some([-1, rest @ ..]) => rest.iter().map(|&d| (d >= 0).then_some(d)).collect(),
            Some(shape) => {
                return Err(Error::FailedPrecondition(format!(
                    "input '{}' of signature '{signature}' has shape {shape:?}, without the \
                     leading batch dimension (-1) that examples are stacked along",
                    spec.name
                )))
            }
        };
        if dims.iter().filter(|d| d.is_none()).count() > 1 {
            return Err(Error::FailedPrecondition(format!(
                "input '{}' of signature '{signature}' has shape {:?}: with more than one free \
                 dimension besides the batch, a feature's values do not say its shape",
                spec.name,
                spec.shape.as_deref().unwrap_or_default()
            )));
        }
        Ok(RowShape {
            dims,
            spec: format!("{:?}", spec.shape.as_deref().unwrap_or(&[-1, -1])),
        })
    }

    /// Checks that a feature with `len` values fits, fixing the free dimension on first use.
    fn accept(&mut self, len: usize) -> Result<(), String> {
        let len = len as i64;
        let fixed: i64 = self.dims.iter().flatten().product();
        match self.dims.iter().position(Option::is_none) {
            Some(free) if fixed > 0 && len % fixed == 0 => {
                self.dims[free] = Some(len / fixed);
                Ok(())
            }
            Some(_) => Err(format!(
                "has {len} value(s), which does not fill shape {} (-1 = any size)",
                self.spec
            )),
            None if len == fixed => Ok(()),
            None => Err(format!(
                "has {len} value(s) but the input takes {fixed} per example (shape {})",
                self.spec
            )),
        }
    }
}

/// The values of one feature.
enum Values<'a> {
    Float(&'a [f32]),
    Int(&'a [i64]),
    Bytes(&'a [Vec<u8>]),
    Empty,
}

impl<'a> Values<'a> {
    fn of(feature: &'a Feature) -> Values<'a> {
        match &feature.kind {
            Some(feature::Kind::FloatList(list)) => Values::Float(&list.value),
            Some(feature::Kind::Int64List(list)) => Values::Int(&list.value),
            Some(feature::Kind::BytesList(list)) => Values::Bytes(&list.value),
            None => Values::Empty,
        }
    }

    /// Elements this feature provides: for bytes, the bytes of its one value.
    fn len(&self) -> usize {
        match self {
            Values::Float(v) => v.len(),
            Values::Int(v) => v.len(),
            Values::Bytes([one]) => one.len(),
            Values::Bytes(v) => v.len(),
            Values::Empty => 0,
        }
    }

    /// Appends the values as elements of the writer's dtype, through the one checked
    /// writer: integers become floats only when exact; floats never become integers (a
    /// tf.Example says which list it holds); 0 and 1 are DT_BOOL's values.
    fn write(&self, out: &mut ElementWriter) -> Result<(), String> {
        let dtype = out.dtype();
        let checked = |e: ElementError| e.to_string();
        match (self, dtype) {
            (Values::Empty, _) => Ok(()),
            (Values::Float(values), _) if is_float(dtype) => values
                .iter()
                .try_for_each(|&v| out.push_float(f64::from(v)).map_err(checked)),
            (Values::Int(values), DType::Bool) => values.iter().try_for_each(|&v| match v {
                0 | 1 => out.push_bool(v == 1).map_err(checked),
                _ => Err("an int64 value other than 0 or 1, which DT_BOOL cannot take".into()),
            }),
            (Values::Int(values), _) => values
                .iter()
                .try_for_each(|&v| out.push_int(v.into()).map_err(checked)),
            (Values::Bytes([one]), DType::U8 | DType::I8) => {
                out.push_raw(one);
                Ok(())
            }
            (Values::Float(_), _) => Err(format!(
                "is a float_list but the input is {dtype}; send an int64_list"
            )),
            (Values::Bytes(_), _) => Err(format!(
                "is a bytes_list, which an input of {dtype} cannot take (a DT_UINT8 or DT_INT8 \
                 input takes the bytes of one value)"
            )),
        }
    }
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::serving::{ExampleList, ExampleListWithContext};
    use crate::proto::tensorflow::{BytesList, Features, FloatList, Int64List};

    fn floats(v: &[f32]) -> Feature {
        Feature {
            kind: Some(feature::Kind::FloatList(FloatList { value: v.to_vec() })),
        }
    }

    fn ints(v: &[i64]) -> Feature {
        Feature {
            kind: Some(feature::Kind::Int64List(Int64List { value: v.to_vec() })),
        }
    }

    fn example(features: Vec<(&str, Feature)>) -> Example {
        Example {
            features: Some(Features {
                feature: features
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            }),
        }
    }

    fn list(examples: Vec<Example>) -> Input {
        Input {
            kind: Some(input::Kind::ExampleList(ExampleList { examples })),
        }
    }

    fn spec(name: &str, dtype: DType, shape: Option<Vec<i64>>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }

    #[test]
    fn examples_stack_into_one_batch() {
        let input = list(vec![
            example(vec![("x", floats(&[1., 2., 3.])), ("n", ints(&[7]))]),
            example(vec![("x", ints(&[4, 5, 6])), ("n", ints(&[-1]))]),
        ]);
        let examples = Examples::from_input(Some(&input)).unwrap();
        let tensors = examples
            .tensors_for(
                "s",
                &[
                    spec("x", DType::F32, Some(vec![-1, 3])),
                    spec("n", DType::I64, Some(vec![-1])),
                ],
                &mut DecodeBudget::unlimited(),
            )
            .unwrap();
        assert_eq!(tensors[0].shape, vec![2, 3]);
        assert_eq!(
            tensors[0].to_values::<f32>().unwrap(),
            vec![1., 2., 3., 4., 5., 6.]
        );
        assert_eq!(tensors[1].shape, vec![2]);
        assert_eq!(tensors[1].to_values::<i64>().unwrap(), vec![7, -1]);
    }

    #[test]
    fn context_fills_what_examples_lack() {
        let input = Input {
            kind: Some(input::Kind::ExampleListWithContext(
                ExampleListWithContext {
                    examples: vec![
                        example(vec![("a", floats(&[1.]))]),
                        example(vec![("a", floats(&[2.])), ("b", floats(&[9.]))]),
                    ],
                    context: Some(example(vec![("b", floats(&[5.])), ("a", floats(&[0.]))])),
                },
            )),
        };
        let examples = Examples::from_input(Some(&input)).unwrap();
        let specs = [
            spec("a", DType::F64, Some(vec![-1, 1])),
            spec("b", DType::F32, Some(vec![-1])),
        ];
        let tensors = examples
            .tensors_for("s", &specs, &mut DecodeBudget::unlimited())
            .unwrap();
        assert_eq!(tensors[0].to_values::<f64>().unwrap(), vec![1., 2.]);
        assert_eq!(tensors[1].to_values::<f32>().unwrap(), vec![5., 9.]);
    }

    #[test]
    fn a_context_copied_into_many_examples_is_charged_before_it_is_built() {
        // `count` empty examples and a context of `width` floats.
        let with_context = |count: usize, width: usize| Input {
            kind: Some(input::Kind::ExampleListWithContext(
                ExampleListWithContext {
                    examples: vec![Example::default(); count],
                    context: Some(example(vec![("x", floats(&vec![0.5; width]))])),
                },
            )),
        };
        let x = [spec("x", DType::F32, Some(vec![-1, -1]))];
        let mut budget = DecodeBudget::new(1 << 30, 0);
        // 200,000 empty examples and a 40 KB context ask for 8 GB (issue 10, bug 3).
        let bomb = with_context(200_000, 10_000);
        let examples = Examples::from_input(Some(&bomb)).unwrap();
        let err = examples.tensors_for("s", &x, &mut budget).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("8000000000 bytes")),
            "{err}"
        );
        // Within the budget, the context does fill every example.
        let few = with_context(3, 2);
        let examples = Examples::from_input(Some(&few)).unwrap();
        let t = &examples.tensors_for("s", &x, &mut budget).unwrap()[0];
        assert_eq!(t.shape, vec![3, 2]);
    }

    #[test]
    fn free_dimensions_and_bytes() {
        let bytes = |b: &[u8]| Feature {
            kind: Some(feature::Kind::BytesList(BytesList {
                value: vec![b.to_vec()],
            })),
        };
        let input = list(vec![
            example(vec![("img", bytes(&[1, 2, 3, 4]))]),
            example(vec![("img", bytes(&[5, 6, 7, 8]))]),
        ]);
        let examples = Examples::from_input(Some(&input)).unwrap();
        let t = &examples
            .tensors_for(
                "s",
                &[spec("img", DType::U8, Some(vec![-1, 2, -1]))],
                &mut DecodeBudget::unlimited(),
            )
            .unwrap()[0];
        assert_eq!(t.shape, vec![2, 2, 2]);
        assert_eq!(&t.data[..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let t = &examples
            .tensors_for(
                "s",
                &[spec("img", DType::U8, None)],
                &mut DecodeBudget::unlimited(),
            )
            .unwrap()[0];
        assert_eq!(t.shape, vec![2, 4]);
    }

    #[test]
    fn bad_examples_say_which_and_why() {
        let check = |input: Input, spec: TensorSpec, needle: &str| {
            let examples = Examples::from_input(Some(&input)).unwrap();
            let err = examples
                .tensors_for("sig", &[spec], &mut DecodeBudget::unlimited())
                .unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "{err} should say {needle}"
            );
        };
        let x3 = || spec("x", DType::F32, Some(vec![-1, 3]));
        check(
            list(vec![example(vec![("y", floats(&[1.]))])]),
            x3(),
            "example 0 has no feature 'x'",
        );
        check(
            list(vec![
                example(vec![("x", floats(&[1., 2., 3.]))]),
                example(vec![("x", floats(&[1.]))]),
            ]),
            x3(),
            "example 1, feature 'x': has 1 value(s) but the input takes 3",
        );
        check(
            list(vec![example(vec![("x", floats(&[1.]))])]),
            spec("x", DType::I64, Some(vec![-1])),
            "float_list",
        );
        check(
            list(vec![example(vec![("x", ints(&[300]))])]),
            spec("x", DType::U8, Some(vec![-1])),
            "out of range",
        );
        check(
            list(vec![example(vec![("x", ints(&[(1 << 24) + 1]))])]),
            spec("x", DType::F32, Some(vec![-1])),
            "cannot hold exactly",
        );
        check(
            list(vec![example(vec![("x", floats(&[1.]))])]),
            spec("x", DType::F32, Some(vec![2])),
            "batch dimension",
        );
        check(
            list(vec![example(vec![("x", floats(&[1.]))])]),
            spec("x", DType::F32, Some(vec![-1, -1, -1])),
            "more than one free",
        );
        assert!(Examples::from_input(None).is_err());
        assert!(Examples::from_input(Some(&list(vec![]))).is_err());
    }
}
