//! The object tree a pickle holds: [`Value`], with tensors as [`TensorRef`] leaves.

use std::fmt;

use crate::DType;

/// A Python object read from a pickle, or to be written to one.
///
/// Only data is represented: containers, scalars, strings, tensors and references to
/// allowlisted classes. `collections.OrderedDict` is kept apart from `dict` so that a
/// re-written file keeps its type; `collections.Counter` reads as a `Dict`,
/// `torch.Size` as a `Tuple`, `bytearray` and `_codecs.encode(…)` as `Bytes`,
/// `set` and `frozenset` as `Set`.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An `int` that fits in 64 bits (larger ones are refused when reading).
    Int(i64),
    /// A `float`.
    Float(f64),
    /// A `complex`.
    Complex(f64, f64),
    /// A `str`.
    String(String),
    /// `bytes` or `bytearray`.
    Bytes(Vec<u8>),
    /// A `list`.
    List(Vec<Value>),
    /// A `tuple` (or `torch.Size`).
    Tuple(Vec<Value>),
    /// A `dict` (or `collections.Counter`), in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A `collections.OrderedDict`, in insertion order.
    OrderedDict(Vec<(Value, Value)>),
    /// A `set` or `frozenset`.
    Set(Vec<Value>),
    /// A tensor (or `nn.Parameter`): a view of a storage.
    Tensor(Box<TensorRef>),
    /// A bare storage (a persistent id not wrapped in a tensor).
    Storage(Box<StorageRef>),
    /// A `torch.dtype` object that kiln knows (`torch.float32`).
    DType(DType),
    /// A `torch.device` (`"cpu"`, `"cuda:0"`).
    Device(String),
    /// Any other allowlisted global referenced as data: a dtype kiln has no type for
    /// (`torch.complex128`), a storage or tensor class, a quantization scheme.
    Global {
        /// The module (`torch`).
        module: String,
        /// The name in the module (`complex128`).
        name: String,
    },
}

impl Value {
    /// The Python type name, for messages (`"dict"`, `"Tensor"`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "NoneType",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Complex(..) => "complex",
            Value::String(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::OrderedDict(_) => "OrderedDict",
            Value::Set(_) => "set",
            Value::Tensor(_) => "Tensor",
            Value::Storage(_) => "Storage",
            Value::DType(_) => "dtype",
            Value::Device(_) => "device",
            Value::Global { .. } => "global",
        }
    }

    /// The items of a `Dict` or an `OrderedDict`.
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) | Value::OrderedDict(items) => Some(items),
            _ => None,
        }
    }

    /// The items of a `List` or a `Tuple`.
    pub fn as_sequence(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) | Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The value under string key `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// The string of a `String`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer of an `Int` (or a `Bool`, as Python does).
    pub fn as_int(&self) -> Option<i64> {
        match *self {
            Value::Int(i) => Some(i),
            Value::Bool(b) => Some(i64::from(b)),
            _ => None,
        }
    }

    /// The number of a `Float` or an `Int`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(f) => Some(f),
            Value::Int(i) => Some(i as f64),
            _ => None,
        }
    }

    /// The tensor of a `Tensor`.
    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Every tensor in the tree with a dotted path (`state.0.exp_avg`), depth first,
    /// in order. Dict keys that are strings or ints name themselves; list and tuple
    /// items are named by their index.
    pub fn tensors(&self) -> Vec<(String, &TensorRef)> {
        let mut out = Vec::new();
        // Iterative, so that a deep tree cannot exhaust the call stack.
        let mut todo: Vec<(String, &Value)> = vec![(String::new(), self)];
        while let Some((path, v)) = todo.pop() {
            let join = |key: String| {
                if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                }
            };
            match v {
                Value::Tensor(t) => out.push((path, &**t)),
                Value::List(items) | Value::Tuple(items) | Value::Set(items) => {
                    for (i, item) in items.iter().enumerate().rev() {
                        todo.push((join(i.to_string()), item));
                    }
                }
                Value::Dict(items) | Value::OrderedDict(items) => {
                    for (k, item) in items.iter().rev() {
                        todo.push((join(k.key_name()), item));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// How a dict key is spelled in a dotted path.
    fn key_name(&self) -> String {
        match self {
            Value::String(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
            Value::None => "None".to_string(),
            Value::Float(f) => f.to_string(),
            other => format!("<{}>", other.type_name()),
        }
    }
}

/// A storage: one record `<prefix>/data/<key>` of the archive, as the pickle's
/// persistent id describes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StorageRef {
    /// The record's key (`"0"`): the part after `data/`.
    pub key: String,
    /// The storage's element type for a legacy typed storage (`torch.FloatStorage`),
    /// `None` for `torch.storage.UntypedStorage` (bytes).
    pub dtype: Option<DType>,
    /// Size in bytes (the persistent id's numel times the element size).
    pub nbytes: u64,
    /// Where the storage lived when saved (`"cpu"`, `"cuda:0"`).
    pub location: String,
}

/// A tensor: a strided view of a storage.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorRef {
    /// The storage it views.
    pub storage: StorageRef,
    /// The tensor's element type.
    pub dtype: DType,
    /// Offset of the first element in the storage, in elements of `dtype`.
    pub offset: u64,
    /// Shape; empty for a 0-d tensor.
    pub shape: Vec<usize>,
    /// Strides in elements, one per dimension.
    pub stride: Vec<usize>,
    /// Whether it was saved with `requires_grad` (an `nn.Parameter` usually is).
    pub requires_grad: bool,
}

impl TensorRef {
    /// A C-contiguous tensor covering the whole storage `key` (offset 0), as a writer
    /// builds it. The storage's byte size is `dtype.size() × numel(shape)`.
    pub fn contiguous(key: impl Into<String>, dtype: DType, shape: Vec<usize>) -> Self {
        let numel = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let nbytes = numel
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .unwrap_or(u64::MAX);
        TensorRef {
            storage: StorageRef {
                key: key.into(),
                dtype: Some(dtype),
                nbytes,
                location: "cpu".to_string(),
            },
            dtype,
            offset: 0,
            stride: contiguous_strides(&shape),
            shape,
            requires_grad: false,
        }
    }

    /// Number of elements (saturating; shapes read from files are validated).
    pub fn numel(&self) -> u64 {
        self.shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .unwrap_or(u64::MAX)
    }

    /// Whether the view is row-major contiguous (dimensions of size 1 may have any
    /// stride, as in torch).
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 {
                if s != expected {
                    return false;
                }
                expected = expected.saturating_mul(d);
            }
        }
        true
    }
}

/// Row-major strides of a shape (saturating).
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut stride = vec![1usize; shape.len()];
    let mut acc = 1usize;
    for i in (0..shape.len()).rev() {
        stride[i] = acc;
        acc = acc.saturating_mul(shape[i].max(1));
    }
    stride
}

impl fmt::Display for Value {
    /// A short Python-like rendering (containers show their length only).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::None => f.write_str("None"),
            Value::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Complex(re, im) => write!(f, "({re:?}+{im:?}j)"),
            Value::String(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => write!(f, "<{} bytes>", b.len()),
            Value::List(v) => write!(f, "<list of {}>", v.len()),
            Value::Tuple(v) => write!(f, "<tuple of {}>", v.len()),
            Value::Dict(v) => write!(f, "<dict of {}>", v.len()),
            Value::OrderedDict(v) => write!(f, "<OrderedDict of {}>", v.len()),
            Value::Set(v) => write!(f, "<set of {}>", v.len()),
            Value::Tensor(t) => write!(f, "<tensor {} {:?}>", t.dtype.torch_name(), t.shape),
            Value::Storage(s) => write!(f, "<storage {} of {} bytes>", s.key, s.nbytes),
            Value::DType(d) => write!(f, "torch.{}", d.torch_name()),
            Value::Device(d) => write!(f, "device({d:?})"),
            Value::Global { module, name } => write!(f, "{module}.{name}"),
        }
    }
}
