//! Ordered dictionaries of tensors and plain values, as broadcast by
//! `broadcast_tensor_dict` and sent by `send_tensor_dict`, and the metadata
//! that travels ahead of their tensors.
//!
//! Values nest (lists, tuples, dicts inside dicts), and tensors may sit at
//! any depth: the metadata is the dict's tree in pre-order with every tensor
//! replaced by its device kind, dtype and shape, and the tensors then travel
//! in that same order. On the wire the tree is a flat list of nodes, so a
//! receiver rebuilds it without recursion, and nesting deeper than
//! [`MAX_DICT_DEPTH`] is refused on both sides.

use comm_core::{CommError, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How deeply values may nest in a [`TensorDict`] that travels (the dict
/// itself is level 1). Deeper values are refused by the sender before
/// anything is sent, and by a receiver that is sent one.
pub const MAX_DICT_DEPTH: usize = 64;

/// A value in a [`TensorDict`]: the Python values FastVideo's metadata
/// usually carries. Anything else serde can encode travels as
/// [`Value::Bytes`] (see [`Value::encode`] / [`Value::decode`]).
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// A tensor (host or device), at any depth.
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
    /// A dtype (`torch.float16` and friends).
    DType(DType),
    /// A list.
    List(Vec<Value>),
    /// A tuple (kept apart from lists so a round trip preserves which it was).
    Tuple(Vec<Value>),
    /// A nested dict with string keys.
    Dict(TensorDict),
}

impl Value {
    /// Any serde value as [`Value::Bytes`] (the counterpart of a pickled
    /// object in FastVideo's metadata); read it back with [`Value::decode`].
    ///
    /// ```
    /// use parallel_state::Value;
    /// let v = Value::encode(&(3u8, "x".to_string())).unwrap();
    /// assert_eq!(v.decode::<(u8, String)>().unwrap(), (3, "x".to_string()));
    /// ```
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Value> {
        Ok(Value::Bytes(dist_utils::codec::encode(value)?))
    }

    /// Decodes a value made by [`Value::encode`].
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        match self {
            Value::Bytes(b) => dist_utils::codec::decode(b),
            other => Err(CommError::invalid(format!(
                "Value::decode needs Value::Bytes, got {}",
                other.kind()
            ))),
        }
    }

    /// The variant's name, for messages.
    fn kind(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "a tensor",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a bool",
            Value::Str(_) => "a str",
            Value::Bytes(_) => "bytes",
            Value::None => "None",
            Value::DType(_) => "a dtype",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
        }
    }
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
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(v.into())
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
impl From<DType> for Value {
    fn from(v: DType) -> Self {
        Value::DType(v)
    }
}
impl From<Vec<Value>> for Value {
    /// A list.
    fn from(v: Vec<Value>) -> Self {
        Value::List(v)
    }
}
impl From<TensorDict> for Value {
    fn from(v: TensorDict) -> Self {
        Value::Dict(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    /// `None` for `None`, the value otherwise.
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::None, Into::into)
    }
}

/// What travels ahead of a tensor of a dict: the device KIND only (as in
/// FastVideo, so every receiver allocates on its own device), dtype, shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TensorMeta {
    pub(crate) cuda: bool,
    pub(crate) dtype: DType,
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

/// One node of a dict's tree in pre-order: a leaf, or a container whose
/// children are the next subtrees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Node {
    Tensor(TensorMeta),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Bytes(Vec<u8>),
    None,
    DType(DType),
    /// A list of this many items.
    List(u32),
    /// A tuple of this many items.
    Tuple(u32),
    /// A dict with these keys, one subtree per key.
    Dict(Vec<String>),
}

/// The metadata of a dict: its tree in pre-order, the root a [`Node::Dict`].
pub(crate) type Metadata = Vec<Node>;

/// An insertion-ordered map from string keys to [`Value`]s.
///
/// ```
/// use parallel_state::{DType, TensorDict, Value};
/// use comm_core::Tensor;
/// let mut d = TensorDict::new();
/// d.insert("x", Tensor::from_vec1(vec![1.0f32, 2.0]));
/// d.insert("step", 3i64);
/// d.insert("sizes", Value::Tuple(vec![4i64.into(), 8i64.into()]));
/// d.insert("dtype", DType::BF16);
/// assert_eq!(d.keys().collect::<Vec<_>>(), ["x", "step", "sizes", "dtype"]);
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

    /// The metadata that travels first, or an error naming the key path
    /// of a value nested deeper than [`MAX_DICT_DEPTH`] (checked before anything
    /// is sent, so peers never see half a dict).
    pub(crate) fn metadata(&self) -> Result<Metadata> {
        let mut out = Vec::new();
        let mut path = Vec::new();
        push_dict(self, 1, &mut path, &mut out)?;
        Ok(out)
    }

    /// Every tensor, at any depth, in the order of [`metadata`](Self::metadata).
    pub(crate) fn tensors(&self) -> Vec<&Tensor> {
        let mut out = Vec::new();
        for (_, v) in &self.entries {
            collect(v, &mut out);
        }
        out
    }

    /// Every tensor, mutably, in the order of [`metadata`](Self::metadata).
    pub(crate) fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out = Vec::new();
        for (_, v) in &mut self.entries {
            collect_mut(v, &mut out);
        }
        out
    }

    /// Rebuilds a dict from received metadata, allocating each tensor with
    /// `alloc`. Iterative (a peer's nesting never grows the call stack) and
    /// bounded by [`MAX_DICT_DEPTH`]; malformed metadata is a protocol error.
    pub(crate) fn from_metadata(
        nodes: Metadata,
        mut alloc: impl FnMut(&TensorMeta) -> Result<Tensor>,
    ) -> Result<TensorDict> {
        let bad = |why: &str| CommError::Protocol(format!("tensor dict metadata: {why}"));
        let mut stack: Vec<Frame> = Vec::new();
        let mut root = None;
        for node in nodes {
            if root.is_some() {
                return Err(bad("nodes after the end of the dict"));
            }
            let mut pending = match node {
                Node::List(n) => {
                    stack.push(Frame::seq(false, n));
                    None
                }
                Node::Tuple(n) => {
                    stack.push(Frame::seq(true, n));
                    None
                }
                Node::Dict(keys) => {
                    stack.push(Frame::Dict {
                        keys,
                        items: Vec::new(),
                    });
                    None
                }
                Node::Tensor(m) => Some(Value::Tensor(alloc(&m)?)),
                Node::Int(i) => Some(Value::Int(i)),
                Node::Float(f) => Some(Value::Float(f)),
                Node::Bool(b) => Some(Value::Bool(b)),
                Node::Str(s) => Some(Value::Str(s)),
                Node::Bytes(b) => Some(Value::Bytes(b)),
                Node::None => Some(Value::None),
                Node::DType(d) => Some(Value::DType(d)),
            };
            if stack.len() > MAX_DICT_DEPTH {
                return Err(bad(&format!("nesting deeper than {MAX_DICT_DEPTH} levels")));
            }
            // Attach the finished value to its parent, closing every
            // container that is now complete.
            loop {
                let top = stack
                    .last_mut()
                    .ok_or_else(|| bad("the root is not a dict"))?;
                if let Some(v) = pending.take() {
                    top.push(v);
                }
                if !top.complete() {
                    break;
                }
                let done = stack.pop().map(Frame::finish);
                if stack.is_empty() {
                    root = done;
                    break;
                }
                pending = done;
            }
        }
        match root {
            Some(Value::Dict(d)) => Ok(d),
            Some(_) => Err(bad("the root is not a dict")),
            None => Err(bad("truncated")),
        }
    }
}

/// A container being rebuilt by [`TensorDict::from_metadata`].
enum Frame {
    Seq {
        tuple: bool,
        want: usize,
        items: Vec<Value>,
    },
    Dict {
        keys: Vec<String>,
        items: Vec<Value>,
    },
}

impl Frame {
    fn seq(tuple: bool, n: u32) -> Frame {
        Frame::Seq {
            tuple,
            want: n as usize,
            items: Vec::new(),
        }
    }
    fn push(&mut self, v: Value) {
        match self {
            Frame::Seq { items, .. } | Frame::Dict { items, .. } => items.push(v),
        }
    }
    fn complete(&self) -> bool {
        match self {
            Frame::Seq { want, items, .. } => items.len() >= *want,
            Frame::Dict { keys, items } => items.len() >= keys.len(),
        }
    }
    fn finish(self) -> Value {
        match self {
            Frame::Seq {
                tuple: true, items, ..
            } => Value::Tuple(items),
            Frame::Seq { items, .. } => Value::List(items),
            Frame::Dict { keys, items } => Value::Dict(keys.into_iter().zip(items).collect()),
        }
    }
}

fn too_deep(path: &[String]) -> CommError {
    CommError::invalid(format!(
        "tensor dict value at `{}` is nested deeper than {MAX_DICT_DEPTH} levels and cannot travel",
        path.join("/")
    ))
}

fn push_dict(
    d: &TensorDict,
    depth: usize,
    path: &mut Vec<String>,
    out: &mut Metadata,
) -> Result<()> {
    if depth > MAX_DICT_DEPTH {
        return Err(too_deep(path));
    }
    out.push(Node::Dict(
        d.entries.iter().map(|(k, _)| k.clone()).collect(),
    ));
    for (k, v) in &d.entries {
        path.push(k.clone());
        push_value(v, depth, path, out)?;
        path.pop();
    }
    Ok(())
}

/// Appends `v` (a child of a container at `depth`) in pre-order.
fn push_value(v: &Value, depth: usize, path: &mut Vec<String>, out: &mut Metadata) -> Result<()> {
    let seq = |items: &[Value], tuple: bool, path: &mut Vec<String>, out: &mut Metadata| {
        if depth + 1 > MAX_DICT_DEPTH {
            return Err(too_deep(path));
        }
        let n = u32::try_from(items.len()).map_err(|_| {
            CommError::invalid(format!(
                "tensor dict value at `{}` has {} items, more than can travel",
                path.join("/"),
                items.len()
            ))
        })?;
        out.push(if tuple { Node::Tuple(n) } else { Node::List(n) });
        for (i, item) in items.iter().enumerate() {
            path.push(i.to_string());
            push_value(item, depth + 1, path, out)?;
            path.pop();
        }
        Ok(())
    };
    match v {
        Value::Tensor(t) => out.push(Node::Tensor(TensorMeta::of(t))),
        Value::Int(i) => out.push(Node::Int(*i)),
        Value::Float(f) => out.push(Node::Float(*f)),
        Value::Bool(b) => out.push(Node::Bool(*b)),
        Value::Str(s) => out.push(Node::Str(s.clone())),
        Value::Bytes(b) => out.push(Node::Bytes(b.clone())),
        Value::None => out.push(Node::None),
        Value::DType(d) => out.push(Node::DType(*d)),
        Value::List(items) => seq(items, false, path, out)?,
        Value::Tuple(items) => seq(items, true, path, out)?,
        Value::Dict(d) => push_dict(d, depth + 1, path, out)?,
    }
    Ok(())
}

fn collect<'a>(v: &'a Value, out: &mut Vec<&'a Tensor>) {
    match v {
        Value::Tensor(t) => out.push(t),
        Value::List(items) | Value::Tuple(items) => items.iter().for_each(|x| collect(x, out)),
        Value::Dict(d) => d.entries.iter().for_each(|(_, x)| collect(x, out)),
        _ => {}
    }
}

fn collect_mut<'a>(v: &'a mut Value, out: &mut Vec<&'a mut Tensor>) {
    match v {
        Value::Tensor(t) => out.push(t),
        Value::List(items) | Value::Tuple(items) => {
            items.iter_mut().for_each(|x| collect_mut(x, out))
        }
        Value::Dict(d) => d.entries.iter_mut().for_each(|(_, x)| collect_mut(x, out)),
        _ => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> Value {
        let mut v = Value::Int(7);
        for _ in 0..depth {
            v = Value::List(vec![v]);
        }
        v
    }

    fn round_trip(d: &TensorDict) -> Result<TensorDict> {
        let meta = d.metadata()?;
        let bytes = dist_utils::codec::encode(&meta)?;
        let back: Metadata = dist_utils::codec::decode(&bytes)?;
        TensorDict::from_metadata(back, |m| Ok(Tensor::zeros(m.shape.clone(), m.dtype)))
    }

    #[test]
    fn metadata_round_trips_nested_values() {
        let mut inner = TensorDict::new();
        inner.insert("t", Tensor::zeros([2, 1], DType::I32));
        inner.insert("empty", Value::List(vec![]));
        let mut d = TensorDict::new();
        d.insert(
            "l",
            vec![
                Value::Int(1),
                Value::Tuple(vec![Value::Str("a".into()), Value::None]),
            ],
        );
        d.insert("d", inner);
        d.insert("dt", DType::F16);
        d.insert("e", TensorDict::new());
        assert_eq!(round_trip(&d).unwrap(), d);
        assert_eq!(d.tensors().len(), 1);
    }

    #[test]
    fn depth_limit_on_both_sides() {
        // The dict is level 1, so a value may add MAX_DICT_DEPTH - 1 levels.
        let mut ok = TensorDict::new();
        ok.insert("x", nested(MAX_DICT_DEPTH - 1));
        assert_eq!(round_trip(&ok).unwrap(), ok);
        let mut deep = TensorDict::new();
        deep.insert("x", nested(MAX_DICT_DEPTH));
        let err = deep.metadata().unwrap_err().to_string();
        assert!(err.contains("deeper than 64"), "{err}");
        // A peer sending deeper nesting is refused without recursion.
        let mut nodes = vec![Node::Dict(vec!["x".into()])];
        nodes.extend((0..100_000).map(|_| Node::List(1)));
        nodes.push(Node::Int(1));
        let err = TensorDict::from_metadata(nodes, |_| unreachable!()).unwrap_err();
        assert!(matches!(err, CommError::Protocol(_)), "{err}");
    }

    #[test]
    fn malformed_metadata_is_a_protocol_error() {
        for nodes in [
            vec![],
            vec![Node::Int(1)],
            vec![Node::Dict(vec!["a".into()])],
            vec![Node::Dict(vec![]), Node::Int(1)],
            vec![Node::List(0)],
        ] {
            let r = TensorDict::from_metadata(nodes.clone(), |_| unreachable!());
            assert!(matches!(r, Err(CommError::Protocol(_))), "{nodes:?}: {r:?}");
        }
    }

    /// A peer's metadata, fuzzed: arbitrary bytes, and arbitrary (mostly
    /// malformed) node sequences, must decode to a dict or a protocol error:
    /// never a panic, a deep recursion or an allocation the bytes did not pay
    /// for (tensors are only described here; the allocator is a stub).
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn cases() -> u32 {
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000)
        }

        fn node() -> impl Strategy<Value = Node> {
            prop_oneof![
                (0usize..8, proptest::collection::vec(0usize..1 << 40, 0..4)).prop_map(
                    |(d, shape)| {
                        Node::Tensor(TensorMeta {
                            cuda: d % 2 == 0,
                            dtype: DType::ALL[d],
                            shape,
                        })
                    }
                ),
                any::<i64>().prop_map(Node::Int),
                any::<f64>().prop_map(Node::Float),
                any::<bool>().prop_map(Node::Bool),
                ".{0,8}".prop_map(Node::Str),
                proptest::collection::vec(any::<u8>(), 0..8).prop_map(Node::Bytes),
                Just(Node::None),
                (0usize..8).prop_map(|d| Node::DType(DType::ALL[d])),
                any::<u32>().prop_map(Node::List),
                (0u32..4).prop_map(Node::Tuple),
                proptest::collection::vec(".{0,4}", 0..4).prop_map(Node::Dict),
            ]
        }

        /// Describes tensors without allocating what a peer claims.
        fn stub(m: &TensorMeta) -> Result<Tensor> {
            let _ = m.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            Ok(Tensor::zeros([0], m.dtype))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases()))]

            #[test]
            fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(meta) = dist_utils::codec::decode::<Metadata>(&bytes) {
                    let _ = TensorDict::from_metadata(meta, stub);
                }
            }

            #[test]
            fn any_nodes(mut nodes in proptest::collection::vec(node(), 0..64), root in proptest::collection::vec(".{0,4}", 0..4)) {
                nodes.insert(0, Node::Dict(root));
                let bytes = dist_utils::codec::encode(&nodes).unwrap();
                let back: Metadata = dist_utils::codec::decode(&bytes).unwrap();
                let _ = TensorDict::from_metadata(back, stub);
            }
        }
    }
}
