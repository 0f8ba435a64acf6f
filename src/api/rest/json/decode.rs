//! Decoding: the body of `:predict` into named tensors (see the module docs above).

use super::{Format, B64};
use crate::error::Error;
use crate::signature::{Signature, TensorSpec};
use crate::tensor::{DType, ElementWriter, Tensor};
use base64::Engine;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt::{self, Write};

/// tensors, still as raw JSON text borrowed from the body.
#[derive(Debug)]
pub struct PredictBody<'a> {
    pub signature_name: String,
    pub format: Format,
    tensors: &'a RawValue,
}

#[derive(Deserialize)]
struct TopLevel<'a> {
    #[serde(default)]
    signature_name: Option<String>,
    #[serde(borrow, default)]
    instances: Option<&'a RawValue>,
    #[serde(borrow, default)]
    inputs: Option<&'a RawValue>,
}

/// Reads a JSON request body: it must be a JSON object. Syntax errors say where they are.
pub fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    match start.map(|i| body[i]) {
        None => {
            return Err(Error::InvalidArgument(
                "JSON parse error: the request body is empty".into(),
            ))
        }
        Some(b'{') => {}
        Some(_) => {
            return Err(Error::InvalidArgument(
                "JSON parse error: the request body must be a JSON object".into(),
            ))
        }
    }
    serde_json::from_slice(body)
        .map_err(|e| Error::InvalidArgument(format!("JSON parse error: {e}")))
}

impl<'a> PredictBody<'a> {
    /// First pass: the top-level keys.
    pub fn parse(body: &'a [u8]) -> Result<PredictBody<'a>, Error> {
        let top: TopLevel<'a> = parse_object(body)?;
        let (format, tensors) = match (top.instances, top.inputs) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "the request has both 'instances' and 'inputs'; send only one of them".into(),
                ))
            }
            (Some(instances), None) => (Format::Row, instances),
            (None, Some(inputs)) => (Format::Columnar, inputs),
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "Missing 'inputs' or 'instances' key".into(),
                ))
            }
        };
        Ok(PredictBody {
            signature_name: top.signature_name.unwrap_or_default(),
            format,
            tensors,
        })
    }

    /// Second pass: the named input tensors of `signature` (named `signature_name` in
    /// errors).
    pub fn tensors(
        &self,
        signature_name: &str,
        signature: &Signature,
    ) -> Result<HashMap<String, Tensor>, Error> {
        decode_tensors(
            self.format,
            self.tensors.get(),
            signature_name,
            &signature.inputs,
        )
    }
}

/// Decodes the value of `"instances"` (row) or `"inputs"` (columnar) into the tensors of
/// `specs`. Exposed for the property tests.
pub fn decode_tensors(
    format: Format,
    json: &str,
    signature_name: &str,
    specs: &[TensorSpec],
) -> Result<HashMap<String, Tensor>, Error> {
    if specs.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "signature '{signature_name}' has no inputs"
        )));
    }
    let mut state = State {
        inputs: specs.iter().map(Dense::new).collect(),
        path: Vec::new(),
        error: None,
        signature: signature_name,
        root: match format {
            Format::Row => "instances",
            Format::Columnar => "inputs",
        },
    };
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let result = match format {
        Format::Row => RowsSeed { state: &mut state }.deserialize(&mut deserializer),
        Format::Columnar => ColumnsSeed { state: &mut state }.deserialize(&mut deserializer),
    };
    if let Err(e) = result.and_then(|()| deserializer.end()) {
        return Err(Error::InvalidArgument(
            state
                .error
                .take()
                .unwrap_or_else(|| format!("{}: {e}", state.root)),
        ));
    }
    let seen = state.inputs.iter().filter(|d| d.seen).count();
    let mut tensors = HashMap::with_capacity(seen);
    for dense in state.inputs {
        if !dense.seen {
            // Only the columnar format may leave an input out (rows check every element).
            return Err(Error::InvalidArgument(format!(
                "Missing named input: '{}' in 'inputs' object (signature '{signature_name}' takes {})",
                dense.spec.name,
                names(specs)
            )));
        }
        let name = dense.spec.name.clone();
        tensors.insert(name, dense.into_tensor()?);
    }
    Ok(tensors)
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One input being decoded: its bytes so far and what is known of its shape.
struct Dense<'s> {
    spec: &'s TensorSpec,
    /// Sizes per depth; `None` while the first list at that depth is still open.
    dims: Vec<Option<i64>>,
    /// The depth values sit at, once the first one is seen.
    rank: Option<usize>,
    data: ElementWriter,
    /// Whether the request provided this input at all.
    seen: bool,
}

impl<'s> Dense<'s> {
    fn new(spec: &'s TensorSpec) -> Dense<'s> {
        Dense {
            spec,
            dims: Vec::new(),
            rank: None,
            data: ElementWriter::new(spec.dtype, 0),
            seen: false,
        }
    }

    fn begin_list(&mut self, depth: usize) -> Result<(), String> {
        if let Some(rank) = self.rank {
            if depth >= rank {
                return Err(format!(
                    "a list where a value was expected (the values of input '{}' sit at depth {rank})",
                    self.spec.name
                ));
            }
        }
        if depth == self.dims.len() {
            self.dims.push(None);
        }
        Ok(())
    }

    fn end_list(&mut self, depth: usize, len: usize) -> Result<(), String> {
        let len = len as i64;
        match self.dims[depth] {
            None => self.dims[depth] = Some(len),
            Some(expected) if expected != len => {
                return Err(format!(
                    "a list of {len} element(s) where the lists before it at this depth have \
                     {expected}; a tensor must be dense"
                ))
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<(), String> {
        match self.rank {
            Some(rank) if rank == depth => Ok(()),
            Some(rank) => Err(format!(
                "a value at depth {depth} where the values before it sit at depth {rank}; a \
                 tensor must be dense"
            )),
            None if depth == self.dims.len() => {
                self.rank = Some(depth);
                Ok(())
            }
            None => Err(format!(
                "a value where a list was expected (an earlier list at depth {depth} is nested \
                 deeper)"
            )),
        }
    }

    fn push_bool(&mut self, v: bool) -> Result<(), String> {
        self.data.push_bool(v).map_err(|e| e.to_string())
    }

    fn push_i128(&mut self, v: i128) -> Result<(), String> {
        self.data.push_int(v).map_err(|e| e.to_string())
    }

    fn push_f64(&mut self, v: f64) -> Result<(), String> {
        self.data.push_float(v).map_err(|e| e.to_string())
    }

    fn push_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        match self.spec.dtype {
            DType::U8 | DType::I8 => {
                self.data.push_raw(bytes);
                Ok(())
            }
            dtype => Err(format!(
                "a {{\"b64\": ...}} value, which only DT_UINT8 and DT_INT8 inputs take (as raw \
                 bytes); input '{}' is {dtype}",
                self.spec.name
            )),
        }
    }

    fn into_tensor(self) -> Result<Tensor, Error> {
        let shape: Vec<i64> = self.dims.iter().map(|d| d.unwrap_or(0)).collect();
        self.data
            .into_tensor(shape)
            .map_err(|e| Error::InvalidArgument(format!("input '{}': {e}", self.spec.name)))
    }
}

/// A step of the path to a value, for error messages.
enum Segment {
    Index(usize),
    Key(String),
}

/// What every visitor of one decode shares: the inputs, where it is, and the first error
/// in full (serde's own error type only carries it as text with a position relative to the
/// raw value, which would mislead).
struct State<'s> {
    inputs: Vec<Dense<'s>>,
    path: Vec<Segment>,
    error: Option<String>,
    signature: &'s str,
    root: &'static str,
}

impl State<'_> {
    fn fail<E: de::Error>(&mut self, message: impl fmt::Display) -> E {
        let mut at = self.root.to_string();
        for segment in &self.path {
            match segment {
                Segment::Index(i) => {
                    let _ = write!(at, "[{i}]");
                }
                Segment::Key(k) => {
                    let _ = write!(at, ".{k}");
                }
            }
        }
        if self.error.is_none() {
            self.error = Some(format!("{at}: {message}"));
        }
        E::custom("invalid tensor")
    }

    fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|d| d.spec.name == name)
    }

    /// Whether an object whose first key is `key` is a base64 value rather than an object
    /// of named inputs (an input actually named "b64" wins).
    fn is_b64_key(&self, key: &str) -> bool {
        key == B64 && self.input_index(B64).is_none()
    }
}

/// A value of one input at `depth` (0 = the tensor itself).
struct ValueSeed<'a, 's> {
    state: &'a mut State<'s>,
    input: usize,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueSeed<'_, '_> {
    fn leaf<E: de::Error>(
        self,
        push: impl FnOnce(&mut Dense<'_>) -> Result<(), String>,
    ) -> Result<(), E> {
        let dense = &mut self.state.inputs[self.input];
        let result = dense.value(self.depth).and_then(|()| push(dense));
        result.map_err(|m| self.state.fail(m))
    }

    /// `{"b64": "..."}` whose key has been read: the bytes form one list.
    fn b64<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let text: std::borrow::Cow<'de, str> = match map.next_value() {
            Ok(text) => text,
            Err(_) => return Err(self.state.fail("the value of \"b64\" must be a string")),
        };
        if map.next_key::<IgnoredAny>()?.is_some() {
            return Err(self
                .state
                .fail("an object with \"b64\" must have no other key"));
        }
        let bytes = match base64::engine::general_purpose::STANDARD.decode(text.as_bytes()) {
            Ok(bytes) => bytes,
            Err(e) => return Err(self.state.fail(format!("invalid base64: {e}"))),
        };
        let (depth, dense) = (self.depth, &mut self.state.inputs[self.input]);
        let result = dense
            .begin_list(depth)
            .and_then(|()| match bytes.is_empty() {
                true => Ok(()),
                false => dense.value(depth + 1),
            })
            .and_then(|()| dense.push_bytes(&bytes))
            .and_then(|()| dense.end_list(depth, bytes.len()));
        result.map_err(|m| self.state.fail(m))
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tensor value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.leaf(|d| d.push_bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.leaf(|d| d.push_i128(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.leaf(|d| d.push_i128(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.leaf(|d| d.push_f64(v))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        if let Some(v) = super::nonfinite_value(text) {
            return self.leaf(|d| d.push_f64(v));
        }
        let dtype = self.state.inputs[self.input].spec.dtype;
        Err(self.state.fail(format!(
            "a string, which an input of {dtype} cannot take (bytes for a DT_UINT8 input go \
             in {{\"b64\": \"...\"}})"
        )))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.state.fail("null is not a tensor value"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (input, depth) = (self.input, self.depth);
        if let Err(m) = self.state.inputs[input].begin_list(depth) {
            return Err(self.state.fail(m));
        }
        let mut len = 0;
        loop {
            self.state.path.push(Segment::Index(len));
            let element = seq.next_element_seed(ValueSeed {
                state: &mut *self.state,
                input,
                depth: depth + 1,
            })?;
            self.state.path.pop();
            if element.is_none() {
                break;
            }
            len += 1;
        }
        if let Err(m) = self.state.inputs[input].end_list(depth, len) {
            return Err(self.state.fail(m));
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let key: Option<std::borrow::Cow<'de, str>> = map.next_key()?;
        match key {
            Some(key) if key == B64 => self.b64(map),
            _ => Err(self.state.fail(
                "an object where a value was expected (only {\"b64\": \"...\"} objects are values)",
            )),
        }
    }
}

/// The value of `"inputs"`: an object of named inputs, or the one input's tensor.
struct ColumnsSeed<'a, 's> {
    state: &'a mut State<'s>,
}

impl<'de> DeserializeSeed<'de> for ColumnsSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! single_input {
    ($self:ident) => {{
        if $self.state.inputs.len() > 1 {
            let names = names_of(&$self.state.inputs);
            return Err($self.state.fail(format!(
                "a plain value or list, but signature '{}' has several inputs ({names}): send \
                 an object of named inputs",
                $self.state.signature
            )));
        }
        $self.state.inputs[0].seen = true;
        ValueSeed {
            state: &mut *$self.state,
            input: 0,
            depth: 0,
        }
    }};
}

fn names_of(inputs: &[Dense<'_>]) -> String {
    inputs
        .iter()
        .map(|d| d.spec.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'de> Visitor<'de> for ColumnsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of named inputs or a tensor")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        single_input!(self).visit_bool(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        single_input!(self).visit_i64(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        single_input!(self).visit_u64(v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        single_input!(self).visit_f64(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        single_input!(self).visit_str(v)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        single_input!(self).visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        single_input!(self).visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut key: Option<std::borrow::Cow<'de, str>> = map.next_key()?;
        if let Some(first) = &key {
            if self.state.is_b64_key(first) {
                return single_input!(self).b64(map);
            }
        }
        while let Some(name) = key {
            match self.state.input_index(&name) {
                // TF Serving ignores keys that name no input.
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
                Some(input) if self.state.inputs[input].seen => {
                    return Err(self.state.fail(format!("input '{name}' is given twice")));
                }
                Some(input) => {
                    self.state.inputs[input].seen = true;
                    self.state.path.push(Segment::Key(name.into_owned()));
                    map.next_value_seed(ValueSeed {
                        state: &mut *self.state,
                        input,
                        depth: 0,
                    })?;
                    self.state.path.pop();
                }
            }
            key = map.next_key()?;
        }
        Ok(())
    }
}

/// The value of `"instances"`: a non-empty list of batch elements.
struct RowsSeed<'a, 's> {
    state: &'a mut State<'s>,
}

impl<'de> DeserializeSeed<'de> for RowsSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// How the elements of `"instances"` name their inputs, fixed by the first element.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RowMode {
    /// Each element is an object of named inputs.
    Named,
    /// Each element is the value of the signature's single input.
    Plain,
}

impl<'de> Visitor<'de> for RowsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // The batch is the outermost list of every input.
        for dense in &mut self.state.inputs {
            let _ = dense.begin_list(0);
        }
        let mut mode = None;
        let mut len = 0;
        loop {
            self.state.path.push(Segment::Index(len));
            let element = seq.next_element_seed(InstanceSeed {
                state: &mut *self.state,
                mode: &mut mode,
            })?;
            self.state.path.pop();
            if element.is_none() {
                break;
            }
            len += 1;
        }
        if len == 0 {
            return Err(self.state.fail("No values in 'instances' array"));
        }
        for dense in &mut self.state.inputs {
            if dense.seen {
                let _ = dense.end_list(0, len);
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self
            .state
            .fail("must be a list (one entry per batch element)"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(self
            .state
            .fail("must be a list (one entry per batch element)"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(self
            .state
            .fail("must be a list (one entry per batch element)"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(self
            .state
            .fail("must be a list (one entry per batch element)"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(self
            .state
            .fail("must be a list (one entry per batch element)"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(self
            .state
            .fail("must be a list (one entry per batch element)"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self
            .state
            .fail("must be a list (one entry per batch element)"))
    }
}

/// One element of `"instances"`.
struct InstanceSeed<'a, 's> {
    state: &'a mut State<'s>,
    mode: &'a mut Option<RowMode>,
}

impl<'de> DeserializeSeed<'de> for InstanceSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'a, 's> InstanceSeed<'a, 's> {
    /// The element as the single input's value at depth 1, checking the mode.
    fn plain<E: de::Error>(self) -> Result<ValueSeed<'a, 's>, E> {
        match *self.mode {
            Some(RowMode::Named) => return Err(self.state.fail(
                "a plain value or list where the elements before it are objects of named inputs",
            )),
            None if self.state.inputs.len() > 1 => {
                let names = names_of(&self.state.inputs);
                return Err(self.state.fail(format!(
                    "instances is a plain list, but signature '{}' has several inputs ({names}): \
                     send a list of objects",
                    self.state.signature
                )));
            }
            _ => {}
        }
        *self.mode = Some(RowMode::Plain);
        self.state.inputs[0].seen = true;
        Ok(ValueSeed {
            state: self.state,
            input: 0,
            depth: 1,
        })
    }
}

impl<'de> Visitor<'de> for InstanceSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a batch element")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.plain()?.visit_bool(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.plain()?.visit_i64(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.plain()?.visit_u64(v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.plain()?.visit_f64(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.plain()?.visit_str(v)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.plain()?.visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.plain()?.visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut key: Option<std::borrow::Cow<'de, str>> = map.next_key()?;
        if let Some(first) = &key {
            if self.state.is_b64_key(first) {
                return self.plain()?.b64(map);
            }
        }
        if *self.mode == Some(RowMode::Plain) {
            return Err(self.state.fail(
                "an object of named inputs where the elements before it are plain values or lists",
            ));
        }
        *self.mode = Some(RowMode::Named);
        let mut present = vec![false; self.state.inputs.len()];
        while let Some(name) = key {
            let Some(input) = self.state.input_index(&name) else {
                let names = names_of(&self.state.inputs);
                return Err(self.state.fail(format!(
                    "'{name}' is not an input of signature '{}' (inputs: {names})",
                    self.state.signature
                )));
            };
            if std::mem::replace(&mut present[input], true) {
                return Err(self.state.fail(format!("input '{name}' is given twice")));
            }
            self.state.inputs[input].seen = true;
            self.state.path.push(Segment::Key(name.into_owned()));
            map.next_value_seed(ValueSeed {
                state: &mut *self.state,
                input,
                depth: 1,
            })?;
            self.state.path.pop();
            key = map.next_key()?;
        }
        if let Some(missing) = present.iter().position(|p| !p) {
            let name = self.state.inputs[missing].spec.name.clone();
            return Err(self.state.fail(format!(
                "input '{name}' is missing; every element must name every input of signature '{}'",
                self.state.signature
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: None,
        }
    }

    fn decode(
        format: Format,
        json: &str,
        specs: &[TensorSpec],
    ) -> Result<HashMap<String, Tensor>, Error> {
        decode_tensors(format, json, "sig", specs)
    }

    fn one(format: Format, json: &str, dtype: DType) -> Tensor {
        let mut t =
            decode(format, json, &[spec("x", dtype)]).unwrap_or_else(|e| panic!("{json}: {e}"));
        t.remove("x").unwrap()
    }

    fn error(format: Format, json: &str, specs: &[TensorSpec]) -> String {
        decode(format, json, specs).unwrap_err().to_string()
    }

    #[test]
    fn row_format_single_unnamed_input() {
        let t = one(Format::Row, "[[1, 2], [3, 4.5]]", DType::F32);
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.to_values::<f32>().unwrap(), vec![1., 2., 3., 4.5]);
        let scalars = one(Format::Row, "[1, 2, 3]", DType::I64);
        assert_eq!(scalars.shape, vec![3]);
        assert_eq!(scalars.to_values::<i64>().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn row_format_named_inputs() {
        let specs = [spec("a", DType::F32), spec("b", DType::I64)];
        let t = decode(
            Format::Row,
            r#"[{"a": [1, 2], "b": 7}, {"b": 8, "a": [3, 4]}]"#,
            &specs,
        )
        .unwrap();
        assert_eq!(t["a"].shape, vec![2, 2]);
        assert_eq!(t["a"].to_values::<f32>().unwrap(), vec![1., 2., 3., 4.]);
        assert_eq!(t["b"].shape, vec![2]);
        assert_eq!(t["b"].to_values::<i64>().unwrap(), vec![7, 8]);
        // One named input, still as objects.
        let t = one(Format::Row, r#"[{"x": [1]}, {"x": [2]}]"#, DType::F64);
        assert_eq!(t.shape, vec![2, 1]);
    }

    #[test]
    fn columnar_format() {
        let specs = [spec("a", DType::F32), spec("b", DType::Bool)];
        let t = decode(
            Format::Columnar,
            r#"{"a": [[1, 2, 3]], "b": true, "ignored": "x"}"#,
            &specs,
        )
        .unwrap();
        assert_eq!(t["a"].shape, vec![1, 3]);
        assert_eq!(t["b"].shape, Vec::<i64>::new());
        assert_eq!(t["b"].to_values::<bool>().unwrap(), vec![true]);
        let scalar = one(Format::Columnar, "2.5", DType::F64);
        assert_eq!(scalar.shape, Vec::<i64>::new());
        let empty = one(Format::Columnar, "[]", DType::F32);
        assert_eq!(empty.shape, vec![0]);
        let empty2 = one(Format::Columnar, "[[], []]", DType::F32);
        assert_eq!(empty2.shape, vec![2, 0]);
    }

    #[test]
    fn base64_is_bytes_along_the_last_dimension() {
        let t = one(
            Format::Row,
            r#"[{"b64": "AAEC"}, {"b64": "AwQF"}]"#,
            DType::U8,
        );
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(&t.data[..], &[0, 1, 2, 3, 4, 5]);
        let t = one(Format::Columnar, r#"{"b64": "/w=="}"#, DType::U8);
        assert_eq!((t.shape.clone(), &t.data[..]), (vec![1], &[255u8][..]));
        let err = error(
            Format::Row,
            r#"[{"b64": "AAEC"}]"#,
            &[spec("x", DType::F32)],
        );
        assert!(err.contains("only DT_UINT8"), "{err}");
        let err = error(Format::Row, r#"[{"b64": "!!"}]"#, &[spec("x", DType::U8)]);
        assert!(err.contains("instances[0]: invalid base64"), "{err}");
    }

    #[test]
    fn numbers_are_exact_or_refused() {
        let t = one(
            Format::Columnar,
            "[9007199254740993, -9223372036854775808]",
            DType::I64,
        );
        assert_eq!(
            t.to_values::<i64>().unwrap(),
            vec![9007199254740993, i64::MIN]
        );
        let t = one(
            Format::Columnar,
            "[0.1, 16777216, 2.0, 3.4028235e38]",
            DType::F32,
        );
        assert_eq!(
            t.to_values::<f32>().unwrap(),
            vec![0.1f32, 16777216., 2., f32::MAX]
        );
        let t = one(Format::Columnar, "[2.0, 1e2]", DType::I32);
        assert_eq!(t.to_values::<i32>().unwrap(), vec![2, 100]);
        for (json, dtype, needle) in [
            ("[16777217]", DType::F32, "cannot hold exactly"),
            ("[9007199254740993]", DType::F64, "cannot hold exactly"),
            ("[1e39]", DType::F32, "out of range for DT_FLOAT"),
            ("[256]", DType::U8, "out of range for DT_UINT8"),
            ("[9223372036854775808]", DType::I64, "out of range"),
            ("[1.5]", DType::I32, "a fractional number"),
            ("[1]", DType::Bool, "true or false"),
            ("[true]", DType::F32, "a boolean"),
            ("[\"a\"]", DType::F32, "a string"),
            ("[null]", DType::F32, "null"),
            ("[{\"a\": 1}]", DType::F32, "an object where a value"),
        ] {
            let err = error(Format::Columnar, json, &[spec("x", dtype)]);
            assert!(err.contains(needle), "{json}: {err} should say {needle}");
            assert!(err.starts_with("inputs[0]: "), "{json}: {err}");
        }
    }

    #[test]
    fn ragged_and_misnamed_tensors_say_where() {
        let x = || [spec("x", DType::F32)];
        let ab = || [spec("a", DType::F32), spec("b", DType::F32)];
        for (format, json, specs, needle) in [
            (Format::Row, "[[1, 2], [3]]", x().to_vec(), "instances[1]: a list of 1 element(s) where the lists before it at this depth have 2"),
            (Format::Row, "[[1, 2], 3]", x().to_vec(), "instances[1]: a value at depth 1"),
            (Format::Row, "[1, [2]]", x().to_vec(), "instances[1]: a list where a value"),
            (Format::Row, "[[], 1]", x().to_vec(), "instances[1]: a value where a list"),
            (Format::Row, "[]", x().to_vec(), "No values in 'instances' array"),
            (Format::Row, "{}", x().to_vec(), "instances: must be a list"),
            (Format::Row, "[[1], [2]]", ab().to_vec(), "several inputs (a, b)"),
            (Format::Row, r#"[{"a": 1, "b": 2}, [3]]"#, ab().to_vec(), "instances[1]: a plain value"),
            (Format::Row, r#"[{"a": 1}]"#, ab().to_vec(), "instances[0]: input 'b' is missing"),
            (Format::Row, r#"[{"a": 1, "b": 2, "c": 3}]"#, ab().to_vec(), "instances[0]: 'c' is not an input"),
            (Format::Row, r#"[{"a": 1, "b": 2, "a": 3}]"#, ab().to_vec(), "given twice"),
            (Format::Row, r#"[{"a": [1, 2], "b": 1}, {"a": [1], "b": 2}]"#, ab().to_vec(), "instances[1].a: a list of 1"),
            (Format::Columnar, r#"{"a": [1]}"#, ab().to_vec(), "Missing named input: 'b'"),
            (Format::Columnar, "[1, 2]", ab().to_vec(), "several inputs"),
            (Format::Columnar, r#"{"a": [[1], [2, 3]], "b": 1}"#, ab().to_vec(), "inputs.a[1]: a list of 2"),
        ] {
            let err = error(format, json, &specs);
            assert!(err.contains(needle), "{json}: '{err}' should contain '{needle}'");
        }
    }

    #[test]
    fn first_pass_checks_syntax_and_keys() {
        let err = PredictBody::parse(b"{\"instances\": [1, 2,]}").unwrap_err();
        assert!(err.to_string().contains("line 1 column 21"), "{err}");
        let err = PredictBody::parse(b"[1]").unwrap_err();
        assert!(err.to_string().contains("must be a JSON object"), "{err}");
        let err = PredictBody::parse(b"  ").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = PredictBody::parse(b"{\"instances\": [1], \"inputs\": [1]}").unwrap_err();
        assert!(err.to_string().contains("only one"), "{err}");
        let err = PredictBody::parse(b"{\"signature_name\": 1, \"inputs\": [1]}").unwrap_err();
        assert!(err.to_string().contains("expected a string"), "{err}");
        let err = PredictBody::parse(b"{}").unwrap_err();
        assert!(
            err.to_string().contains("Missing 'inputs' or 'instances'"),
            "{err}"
        );
        let body =
            PredictBody::parse(b"{\"signature_name\": \"s\\u0031\", \"inputs\": {\"x\": 1}}")
                .unwrap();
        assert_eq!(
            (body.signature_name.as_str(), body.format),
            ("s1", Format::Columnar)
        );
    }
}
