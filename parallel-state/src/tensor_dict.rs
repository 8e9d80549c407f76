//! Ordered dictionaries of tensors and plain values, as broadcast by
//! `broadcast_tensor_dict` and sent by `send_tensor_dict`.

use comm_core::Tensor;
use serde::{Deserialize, Serialize};

/// A value in a [`TensorDict`].
#[derive(Debug, PartialEq)]
pub enum Value {
    /// A tensor (host or device).
    Tensor(Tensor),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// Python's `None`.
    None,
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::Tensor(t)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}

/// What travels ahead of the tensors: every value, with tensors replaced by
/// their metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum MetaValue {
    Tensor(TensorMeta),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Bytes(Vec<u8>),
    None,
}

/// What travels ahead of a tensor of a dict: the device KIND only (as in
/// FastVideo, so every receiver allocates on its own device), dtype, shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TensorMeta {
    pub(crate) cuda: bool,
    pub(crate) dtype: comm_core::DType,
    pub(crate) shape: Vec<usize>,
}

impl TensorMeta {
    pub(crate) fn of(t: &Tensor) -> Self {
        TensorMeta {
            cuda: t.device().is_cuda(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        }
    }
}

/// An insertion-ordered map from string keys to [`Value`]s.
///
/// ```
/// use parallel_state::{TensorDict, Value};
/// use comm_core::Tensor;
/// let mut d = TensorDict::new();
/// d.insert("x", Tensor::from_vec1(vec![1.0f32, 2.0]));
/// d.insert("step", 3i64);
/// assert_eq!(d.keys().collect::<Vec<_>>(), ["x", "step"]);
/// assert_eq!(d.get("step"), Some(&Value::Int(3)));
/// ```
#[derive(Debug, Default, PartialEq)]
pub struct TensorDict {
    entries: Vec<(String, Value)>,
}

impl TensorDict {
    /// An empty dict.
    pub fn new() -> Self {
        Self::default()
    }
    /// Inserts or replaces `key` (a replaced key keeps its position).
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let key = key.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = value,
            None => self.entries.push((key, value)),
        }
    }
    /// The value at `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// The tensor at `key`, if the value is a tensor.
    pub fn tensor(&self, key: &str) -> Option<&Tensor> {
        match self.get(key) {
            Some(Value::Tensor(t)) => Some(t),
            _ => None,
        }
    }
    /// Keys in insertion order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }
    /// Entries in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub(crate) fn entries_mut(&mut self) -> &mut Vec<(String, Value)> {
        &mut self.entries
    }

    /// Splits into the metadata list that travels first.
    pub(crate) fn metadata(&self) -> Vec<(String, MetaValue)> {
        self.entries
            .iter()
            .map(|(k, v)| {
                let m = match v {
                    Value::Tensor(t) => MetaValue::Tensor(TensorMeta::of(t)),
                    Value::Int(i) => MetaValue::Int(*i),
                    Value::Float(f) => MetaValue::Float(*f),
                    Value::Bool(b) => MetaValue::Bool(*b),
                    Value::Str(s) => MetaValue::Str(s.clone()),
                    Value::Bytes(b) => MetaValue::Bytes(b.clone()),
                    Value::None => MetaValue::None,
                };
                (k.clone(), m)
            })
            .collect()
    }
}

impl FromIterator<(String, Value)> for TensorDict {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        let mut d = TensorDict::new();
        for (k, v) in iter {
            d.insert(k, v);
        }
        d
    }
}
