//! What `REDUCE`, `NEWOBJ` and `BINPERSID` may build: the allowlisted rebuild
//! functions of torch (tensors, parameters) and of Python (`OrderedDict`, `set`,
//! `bytes`, …), interpreted here as data; nothing is ever called.

use super::allowlist::storage_dtype;
use super::read::{Id, Node, Vm, describe, err, node_type};
use super::value::{StorageRef, TensorRef, Value};
use crate::{Error, Result};

impl Vm<'_> {
    /// `REDUCE` (and INST/OBJ): calls one of the allowlisted rebuild functions.
    pub(super) fn call(&mut self, func: Id, args: &[Id]) -> Result<Node> {
        let Some(name) = self.global_name(func) else {
            let what = match self.leaf(func) {
                Some(v) => describe(v),
                None => format!("a {}", node_type(&self.nodes[func])),
            };
            return Err(Error::Forbidden(format!("calling {what} is not allowed")));
        };
        let value = match name.as_str() {
            "collections.OrderedDict" => {
                return Ok(Node::OrderedDict(self.dict_init(args, &name)?));
            }
            "collections.Counter" => return Ok(Node::Dict(self.dict_init(args, &name)?)),
            "builtins.set" => {
                return Ok(Node::Set(match args {
                    [] => Vec::new(),
                    [items] => self.iterable(*items, &name)?,
                    _ => return Err(bad_args(&name)),
                }));
            }
            "torch.Size" => {
                let [items] = args else {
                    return Err(bad_args(&name));
                };
                return Ok(Node::Tuple(self.iterable(*items, &name)?));
            }
            "builtins.bytearray" => match args {
                [] => Value::Bytes(Vec::new()),
                [b] => match self.leaf(*b) {
                    Some(Value::Bytes(b)) => Value::Bytes(b.clone()),
                    _ => return Err(bad_args(&name)),
                },
                [s, enc] => Value::Bytes(self.encode(*s, *enc)?),
                _ => return Err(bad_args(&name)),
            },
            "_codecs.encode" => match args {
                [s, enc] => Value::Bytes(self.encode(*s, *enc)?),
                _ => return Err(bad_args(&name)),
            },
            "builtins.complex" => {
                let num = |id: &Id| self.leaf(*id).and_then(Value::as_f64);
                match args {
                    [] => Value::Complex(0.0, 0.0),
                    [re] => Value::Complex(num(re).ok_or_else(|| bad_args(&name))?, 0.0),
                    [re, im] => Value::Complex(
                        num(re).ok_or_else(|| bad_args(&name))?,
                        num(im).ok_or_else(|| bad_args(&name))?,
                    ),
                    _ => return Err(bad_args(&name)),
                }
            }
            "torch.device" => {
                let s = |id: &Id| match self.leaf(*id) {
                    Some(Value::String(s)) => Some(s.clone()),
                    _ => None,
                };
                match args {
                    [d] => Value::Device(s(d).ok_or_else(|| bad_args(&name))?),
                    [d, i] => {
                        let d = s(d).ok_or_else(|| bad_args(&name))?;
                        match self.leaf(*i) {
                            Some(Value::Int(i)) => Value::Device(format!("{d}:{i}")),
                            Some(Value::None) => Value::Device(d),
                            _ => return Err(bad_args(&name)),
                        }
                    }
                    _ => return Err(bad_args(&name)),
                }
            }
            "torch._utils._rebuild_tensor" => match args {
                [s, o, size, stride] => self.rebuild_tensor(*s, *o, *size, *stride, None, None)?,
                _ => return Err(bad_args(&name)),
            },
            "torch._utils._rebuild_tensor_v2" => match args {
                [s, o, size, stride, g, _hooks] | [s, o, size, stride, g, _hooks, _] => {
                    self.rebuild_tensor(*s, *o, *size, *stride, Some(*g), None)?
                }
                _ => return Err(bad_args(&name)),
            },
            "torch._utils._rebuild_tensor_v3" => match args {
                [s, o, size, stride, g, _hooks, d] | [s, o, size, stride, g, _hooks, d, _] => {
                    self.rebuild_tensor(*s, *o, *size, *stride, Some(*g), Some(*d))?
                }
                _ => return Err(bad_args(&name)),
            },
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                match args {
                    [t, g, _hooks] | [t, g, _hooks, _] => self.parameter(*t, Some(*g))?,
                    _ => return Err(bad_args(&name)),
                }
            }
            "torch.nn.parameter.Parameter" => match args {
                [t] => self.parameter(*t, None)?,
                [t, g] => self.parameter(*t, Some(*g))?,
                _ => return Err(bad_args(&name)),
            },
            "torch._tensor._rebuild_from_type_v2" => {
                let [func, new_type, inner, _state] = args else {
                    return Err(bad_args(&name));
                };
                let cls = self.global_name(*new_type).unwrap_or_default();
                if !(cls == "torch.Tensor" || cls == "torch.nn.parameter.Parameter") {
                    return Err(Error::Unsupported(format!(
                        "tensor subclass {}",
                        if cls.is_empty() { "?" } else { &cls }
                    )));
                }
                // Only a plain rebuild function may be wrapped (no nesting of this one).
                let inner_func = self.global_name(*func).unwrap_or_default();
                if !inner_func.starts_with("torch._utils._rebuild_") {
                    return Err(Error::Forbidden(format!(
                        "_rebuild_from_type_v2 calling {} is not allowed",
                        if inner_func.is_empty() {
                            "a non-global"
                        } else {
                            &inner_func
                        }
                    )));
                }
                let inner = self.tuple_items(*inner, "_rebuild_from_type_v2 arguments")?;
                let node = self.call(*func, &inner)?;
                if !matches!(node, Node::Leaf(Value::Tensor(_))) {
                    return Err(err("_rebuild_from_type_v2 did not rebuild a tensor"));
                }
                return Ok(node);
            }
            "torch._utils._rebuild_qtensor" => return Err(unsupported(&name, "quantized tensors")),
            "torch._utils._rebuild_sparse_tensor" => {
                return Err(unsupported(&name, "sparse tensors"));
            }
            "torch._utils._rebuild_meta_tensor_no_storage" => {
                return Err(unsupported(&name, "meta tensors"));
            }
            "torch._utils._rebuild_wrapper_subclass" => {
                return Err(unsupported(&name, "tensor subclasses"));
            }
            "torch._utils._rebuild_device_tensor_from_numpy"
            | "torch._utils._rebuild_device_tensor_from_cpu_tensor" => {
                return Err(unsupported(&name, "device tensors"));
            }
            "torch.serialization._get_layout" => {
                return Err(unsupported(&name, "tensor layouts"));
            }
            _ => {
                return Err(Error::Forbidden(format!("calling {name} is not allowed")));
            }
        };
        Ok(Node::Leaf(value))
    }

    /// `NEWOBJ`: `cls.__new__(cls, *args)` for the classes that make sense.
    pub(super) fn new_object(&mut self, cls: Id, args: &[Id]) -> Result<Node> {
        let name = self.global_name(cls).unwrap_or_default();
        match name.as_str() {
            "torch.nn.parameter.Parameter" | "torch.Size" => self.call(cls, args),
            "collections.OrderedDict" => Ok(Node::OrderedDict(Vec::new())),
            "collections.Counter" => Ok(Node::Dict(Vec::new())),
            "builtins.set" => Ok(Node::Set(Vec::new())),
            _ => {
                let what = match self.leaf(cls) {
                    Some(v) => describe(v),
                    None => format!("a {}", node_type(&self.nodes[cls])),
                };
                Err(Error::Forbidden(format!(
                    "creating an object of {what} is not allowed"
                )))
            }
        }
    }

    /// The items of `OrderedDict(…)` / `Counter(…)`: nothing, a dict, or an iterable
    /// of pairs.
    fn dict_init(&self, args: &[Id], name: &str) -> Result<Vec<Id>> {
        match args {
            [] => Ok(Vec::new()),
            [x] => match &self.nodes[*x] {
                Node::Dict(d) | Node::OrderedDict(d) => Ok(d.clone()),
                Node::List(items) | Node::Tuple(items) => {
                    let mut flat = Vec::with_capacity(items.len() * 2);
                    for &p in items {
                        match &self.nodes[p] {
                            Node::Tuple(kv) | Node::List(kv) if kv.len() == 2 => {
                                flat.extend_from_slice(kv)
                            }
                            _ => return Err(bad_args(name)),
                        }
                    }
                    Ok(flat)
                }
                _ => Err(bad_args(name)),
            },
            _ => Err(bad_args(name)),
        }
    }

    fn iterable(&self, id: Id, name: &str) -> Result<Vec<Id>> {
        match &self.nodes[id] {
            Node::List(v) | Node::Tuple(v) | Node::Set(v) => Ok(v.clone()),
            _ => Err(bad_args(name)),
        }
    }

    /// `_codecs.encode(str, encoding)`: how protocol 2 writes `bytes`.
    fn encode(&self, s: Id, enc: Id) -> Result<Vec<u8>> {
        let (Some(Value::String(s)), Some(Value::String(enc))) = (self.leaf(s), self.leaf(enc))
        else {
            return Err(err("_codecs.encode needs a string and an encoding"));
        };
        match enc.to_ascii_lowercase().replace('_', "-").as_str() {
            "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" => s
                .chars()
                .map(|c| u8::try_from(u32::from(c)).map_err(|_| err("character beyond latin-1")))
                .collect(),
            "utf-8" | "utf8" => Ok(s.as_bytes().to_vec()),
            "ascii" if s.is_ascii() => Ok(s.as_bytes().to_vec()),
            other => Err(Error::Unsupported(format!("text encoding {other:?}"))),
        }
    }

    fn int_arg(&self, id: Id, what: &str) -> Result<i64> {
        match self.leaf(id) {
            Some(Value::Int(i)) => Ok(*i),
            Some(Value::Bool(b)) => Ok(i64::from(*b)),
            _ => Err(err(format!("{what} must be an int"))),
        }
    }

    fn dims(&self, id: Id, what: &str) -> Result<Vec<usize>> {
        let items = match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => v,
            _ => return Err(err(format!("tensor {what} must be a tuple"))),
        };
        items
            .iter()
            .map(|&i| {
                let v = self.int_arg(i, what)?;
                if v < 0 {
                    return Err(Error::Unsupported(format!("negative tensor {what} {v}")));
                }
                usize::try_from(v).map_err(|_| Error::Unsupported(format!("tensor {what} {v}")))
            })
            .collect()
    }

    fn rebuild_tensor(
        &self,
        storage: Id,
        offset: Id,
        size: Id,
        stride: Id,
        requires_grad: Option<Id>,
        dtype: Option<Id>,
    ) -> Result<Value> {
        let storage = match self.leaf(storage) {
            Some(Value::Storage(s)) => (**s).clone(),
            _ => return Err(err("a tensor's storage must be a persistent id")),
        };
        let offset = self.int_arg(offset, "storage offset")?;
        let offset = u64::try_from(offset)
            .map_err(|_| Error::Unsupported(format!("negative storage offset {offset}")))?;
        let shape = self.dims(size, "size")?;
        let stride = self.dims(stride, "stride")?;
        if shape.len() != stride.len() {
            return Err(err(format!(
                "tensor size has {} dimensions, stride {}",
                shape.len(),
                stride.len()
            )));
        }
        let requires_grad = match requires_grad {
            Some(g) => self.int_arg(g, "requires_grad")? != 0,
            None => false,
        };
        let dtype = match dtype {
            None => storage.dtype.ok_or_else(|| {
                err("_rebuild_tensor_v2 on an untyped storage (the dtype is unknown)")
            })?,
            Some(d) => match self.leaf(d) {
                Some(Value::DType(d)) => *d,
                Some(Value::Global { module, name }) => {
                    return Err(Error::Unsupported(format!("dtype {module}.{name}")));
                }
                _ => return Err(err("_rebuild_tensor_v3's dtype must be a torch dtype")),
            },
        };
        Ok(Value::Tensor(Box::new(TensorRef {
            storage,
            dtype,
            offset,
            shape,
            stride,
            requires_grad,
        })))
    }

    fn parameter(&self, data: Id, requires_grad: Option<Id>) -> Result<Value> {
        let Some(Value::Tensor(t)) = self.leaf(data) else {
            return Err(err("a Parameter must wrap a tensor"));
        };
        let mut t = t.clone();
        t.requires_grad = match requires_grad {
            Some(g) => self.int_arg(g, "requires_grad")? != 0,
            None => true,
        };
        Ok(Value::Tensor(t))
    }

    /// `BINPERSID`: `('storage', storage_type, key, location, numel)`.
    pub(super) fn persistent_load(&self, pid: Id) -> Result<StorageRef> {
        let items = match &self.nodes[pid] {
            Node::Tuple(items) => items,
            other => {
                return Err(Error::Unsupported(format!(
                    "persistent id that is a {}, not a storage tuple",
                    node_type(other)
                )));
            }
        };
        if items
            .first()
            .is_some_and(|&tag| self.leaf(tag) != Some(&Value::String("storage".into())))
        {
            return Err(Error::Forbidden(
                "persistent id that is not a storage".into(),
            ));
        }
        let [_, ty, key, location, numel] = items.as_slice() else {
            return Err(err(format!(
                "persistent id with {} items, expected 5",
                items.len()
            )));
        };
        let dtype = match self.leaf(*ty) {
            Some(Value::Global { module, name }) => storage_dtype(module, name)?,
            _ => return Err(err("persistent id without a storage type")),
        };
        let key = match self.leaf(*key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Int(i)) => i.to_string(),
            _ => return Err(err("storage key must be a string")),
        };
        let location = match self.leaf(*location) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Device(s)) => s.clone(),
            _ => return Err(err("storage location must be a string")),
        };
        let numel = self.int_arg(*numel, "storage numel")?;
        let nbytes = u64::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(dtype.map_or(1, |d| d.size() as u64)))
            .ok_or_else(|| err(format!("storage numel {numel} out of range")))?;
        Ok(StorageRef {
            key,
            dtype,
            nbytes,
            location,
        })
    }
}

fn bad_args(name: &str) -> Error {
    err(format!("unexpected arguments to {name}"))
}

fn unsupported(name: &str, what: &str) -> Error {
    Error::Unsupported(format!("{what} ({name})"))
}
