//! A weights-only pickle reader: a small virtual machine (stack, memo, mark stack)
//! that understands every opcode of protocols 0 to 5 and builds a [`Value`] tree.
//!
//! Nothing is ever imported or executed. Globals are checked against the
//! allowlist ([`super::allowlist`]) when named; `REDUCE`, `NEWOBJ` and `BUILD` are
//! interpreted only for the handful of callables that rebuild data (tensors,
//! `OrderedDict`, `torch.Size`, …). Every length is checked against the bytes left
//! before anything is allocated, and the number of objects and the nesting depth
//! are bounded ([`Limits`]).
//!
//! Objects live in an arena while the stream is read, so that a container memoized
//! before it is filled (as every pickler does) is the same object when fetched
//! again; the finished tree is then copied out.

use std::collections::HashMap;

use super::allowlist::{resolve_global, storage_dtype};
use super::ops::{self, *};
use super::value::{StorageRef, TensorRef, Value};
use crate::{Error, Result};

/// Bounds that protect the reader against hostile streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of containers in the result.
    pub max_depth: usize,
    /// Most objects created while reading, and in the result.
    pub max_objects: usize,
    /// Most bytes of strings and bytes in the result (shared objects count once per
    /// appearance), on top of eight times the stream's length.
    pub max_extra_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 1000,
            max_objects: 10_000_000,
            max_extra_bytes: 64 << 20,
        }
    }
}

/// Reads a pickle stream (weights-only) into a [`Value`] with the default limits.
pub fn load(data: &[u8]) -> Result<Value> {
    load_with_limits(data, Limits::default())
}

/// Reads a pickle stream (weights-only) into a [`Value`].
pub fn load_with_limits(data: &[u8], limits: Limits) -> Result<Value> {
    let mut vm = Vm {
        data,
        pos: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        limits,
    };
    let root = vm.run()?;
    let mut budget = Budget {
        objects: limits.max_objects,
        bytes: limits
            .max_extra_bytes
            .saturating_add(data.len().saturating_mul(8)),
    };
    vm.convert(root, &mut budget)
}

type Id = usize;

/// An object in the arena: a leaf value, or a container of other objects.
#[derive(Debug)]
enum Node {
    Leaf(Value),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    /// Keys and values, flattened: `k0, v0, k1, v1, …`.
    Dict(Vec<Id>),
    /// As `Dict`.
    OrderedDict(Vec<Id>),
    Set(Vec<Id>),
}

struct Budget {
    objects: usize,
    bytes: usize,
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    limits: Limits,
}

fn err(msg: impl Into<String>) -> Error {
    Error::Pickle(msg.into())
}

impl<'a> Vm<'a> {
    // ---- reading bytes -------------------------------------------------------

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data = self.data;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                err(format!(
                    "truncated: {n} bytes wanted at offset {}, {} left",
                    self.pos,
                    data.len() - self.pos
                ))
            })?;
        let s = &data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn take_len(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| err(format!("length {n} too large")))?;
        self.take(n)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A text line without its `\n` (protocol 0 arguments).
    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| {
            err(format!(
                "truncated: no end of line after offset {}",
                self.pos
            ))
        })?;
        let line = &rest[..n];
        self.pos += n + 1;
        Ok(line)
    }

    fn line_str(&mut self) -> Result<&'a str> {
        let line = self.line()?;
        std::str::from_utf8(line).map_err(|_| err("invalid UTF-8 in a text argument"))
    }

    // ---- the stack -----------------------------------------------------------

    fn alloc(&mut self, node: Node) -> Result<Id> {
        if self.nodes.len() >= self.limits.max_objects {
            return Err(err(format!(
                "more than {} objects",
                self.limits.max_objects
            )));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, node: Node) -> Result<()> {
        let id = self.alloc(node)?;
        self.stack.push(id);
        Ok(())
    }

    fn push_value(&mut self, v: Value) -> Result<()> {
        self.push(Node::Leaf(v))
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id> {
        if self.stack.len() <= self.floor() {
            return Err(err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| err("stack underflow"))
    }

    fn top(&self) -> Result<Id> {
        if self.stack.len() <= self.floor() {
            return Err(err("stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| err("no MARK on the stack"))?;
        if mark > self.stack.len() {
            return Err(err("stack underflow below MARK"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn leaf(&self, id: Id) -> Option<&Value> {
        match &self.nodes[id] {
            Node::Leaf(v) => Some(v),
            _ => None,
        }
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| err(format!("memo index {key} is not defined")))?;
        self.stack.push(id);
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let id = self.top()?;
        if self.memo.len() >= self.limits.max_objects {
            return Err(err("memo too large"));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    // ---- the machine ---------------------------------------------------------

    /// Runs to STOP and returns the arena id of the result.
    fn run(&mut self) -> Result<Id> {
        loop {
            let at = self.pos;
            let op = self.take(1).map_err(|_| err("truncated: no STOP opcode"))?[0];
            match self.step(op) {
                Ok(true) => {}
                Ok(false) => {
                    let id = self.pop()?;
                    return Ok(id);
                }
                Err(Error::Pickle(m)) => {
                    return Err(Error::Pickle(format!(
                        "{m} (opcode {} at offset {at})",
                        ops::name(op)
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Executes one opcode; `Ok(false)` at STOP.
    fn step(&mut self, op: u8) -> Result<bool> {
        match op {
            STOP => return Ok(false),
            PROTO => {
                let v = self.u8()?;
                if v > 5 {
                    return Err(err(format!("unsupported pickle protocol {v}")));
                }
            }
            FRAME => {
                let n = self.u64()?;
                let left = (self.data.len() - self.pos) as u64;
                if n > left {
                    return Err(err(format!("frame of {n} bytes, {left} left")));
                }
            }
            MARK => self.marks.push(self.stack.len()),
            POP => {
                if self.stack.len() > self.floor() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            POP_MARK => {
                self.pop_mark()?;
            }
            DUP => {
                let id = self.top()?;
                self.stack.push(id);
            }

            // Scalars.
            NONE => self.push_value(Value::None)?,
            NEWTRUE => self.push_value(Value::Bool(true))?,
            NEWFALSE => self.push_value(Value::Bool(false))?,
            BININT => {
                let v = self.i32()?;
                self.push_value(Value::Int(v.into()))?
            }
            BININT1 => {
                let v = self.u8()?;
                self.push_value(Value::Int(v.into()))?
            }
            BININT2 => {
                let v = self.u16()?;
                self.push_value(Value::Int(v.into()))?
            }
            LONG1 => {
                let n = self.u8()?;
                let bytes = self.take(n.into())?;
                let v = le_signed(bytes)?;
                self.push_value(Value::Int(v))?
            }
            LONG4 => {
                let n = self.i32()?;
                let n = u64::try_from(n).map_err(|_| err("negative LONG4 length"))?;
                let bytes = self.take_len(n)?;
                let v = le_signed(bytes)?;
                self.push_value(Value::Int(v))?
            }
            INT => {
                let line = self.line_str()?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(parse_int(s)?),
                };
                self.push_value(v)?
            }
            LONG => {
                let line = self.line_str()?;
                let v = parse_int(line.strip_suffix('L').unwrap_or(line))?;
                self.push_value(Value::Int(v))?
            }
            BINFLOAT => {
                let v = f64::from_be_bytes(self.array()?);
                self.push_value(Value::Float(v))?
            }
            FLOAT => {
                let line = self.line_str()?;
                let v: f64 = line
                    .trim()
                    .parse()
                    .map_err(|_| err(format!("bad float {line:?}")))?;
                self.push_value(Value::Float(v))?
            }

            // Strings and bytes.
            BINUNICODE => {
                let n = self.u32()?;
                self.push_utf8(n.into())?
            }
            SHORT_BINUNICODE => {
                let n = self.u8()?;
                self.push_utf8(n.into())?
            }
            BINUNICODE8 => {
                let n = self.u64()?;
                self.push_utf8(n)?
            }
            SHORT_BINSTRING => {
                let n = self.u8()?;
                self.push_utf8(n.into())?
            }
            BINSTRING => {
                let n = self.i32()?;
                let n = u64::try_from(n).map_err(|_| err("negative BINSTRING length"))?;
                self.push_utf8(n)?
            }
            STRING => {
                let line = self.line()?;
                let s = unquote_string(line)?;
                self.push_value(Value::String(s))?
            }
            UNICODE => {
                let line = self.line()?;
                let s = raw_unicode_escape(line)?;
                self.push_value(Value::String(s))?
            }
            SHORT_BINBYTES => {
                let n = self.u8()?;
                let b = self.take(n.into())?;
                self.push_value(Value::Bytes(b.to_vec()))?
            }
            BINBYTES => {
                let n = self.u32()?;
                let b = self.take_len(n.into())?;
                self.push_value(Value::Bytes(b.to_vec()))?
            }
            BINBYTES8 | BYTEARRAY8 => {
                let n = self.u64()?;
                let b = self.take_len(n)?;
                self.push_value(Value::Bytes(b.to_vec()))?
            }

            // Containers.
            EMPTY_TUPLE => self.push(Node::Tuple(Vec::new()))?,
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = usize::from(op - TUPLE1) + 1;
                if self.stack.len() < self.floor() + n {
                    return Err(err("stack underflow"));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.push(Node::Tuple(items))?
            }
            TUPLE => {
                let items = self.pop_mark()?;
                self.push(Node::Tuple(items))?
            }
            EMPTY_LIST => self.push(Node::List(Vec::new()))?,
            LIST => {
                let items = self.pop_mark()?;
                self.push(Node::List(items))?
            }
            EMPTY_DICT => self.push(Node::Dict(Vec::new()))?,
            DICT => {
                let items = self.pop_mark()?;
                let pairs = pairs(&items)?;
                self.push(Node::Dict(pairs))?
            }
            EMPTY_SET => self.push(Node::Set(Vec::new()))?,
            FROZENSET => {
                let items = self.pop_mark()?;
                self.push(Node::Set(items))?
            }
            APPEND => {
                let item = self.pop()?;
                let list = self.top()?;
                self.extend_list(list, &[item])?
            }
            APPENDS => {
                let items = self.pop_mark()?;
                let list = self.top()?;
                self.extend_list(list, &items)?
            }
            SETITEM => {
                let v = self.pop()?;
                let k = self.pop()?;
                let dict = self.top()?;
                self.extend_dict(dict, &[k, v])?
            }
            SETITEMS => {
                let items = self.pop_mark()?;
                let dict = self.top()?;
                self.extend_dict(dict, &items)?
            }
            ADDITEMS => {
                let items = self.pop_mark()?;
                let set = self.top()?;
                match &mut self.nodes[set] {
                    Node::Set(v) => v.extend(items),
                    _ => return Err(err("ADDITEMS on something that is not a set")),
                }
            }

            // Memo.
            BINPUT => {
                let i = self.u8()?;
                self.memo_put(i.into())?
            }
            LONG_BINPUT => {
                let i = self.u32()?;
                self.memo_put(i.into())?
            }
            PUT => {
                let line = self.line_str()?;
                let i = parse_index(line)?;
                self.memo_put(i)?
            }
            MEMOIZE => {
                let i = self.memo.len() as u64;
                self.memo_put(i)?
            }
            BINGET => {
                let i = self.u8()?;
                self.memo_get(i.into())?
            }
            LONG_BINGET => {
                let i = self.u32()?;
                self.memo_get(i.into())?
            }
            GET => {
                let line = self.line_str()?;
                let i = parse_index(line)?;
                self.memo_get(i)?
            }

            // Globals and calls.
            GLOBAL => {
                let module = self.line_str()?;
                let name = self.line_str()?;
                let v = resolve_global(module, name)?;
                self.push_value(v)?
            }
            STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Some(Value::String(module)), Some(Value::String(name))) =
                    (self.leaf(module), self.leaf(name))
                else {
                    return Err(err("STACK_GLOBAL needs two strings"));
                };
                let v = resolve_global(module, name)?;
                self.push_value(v)?
            }
            REDUCE => {
                let args = self.pop()?;
                let func = self.pop()?;
                let args = self.tuple_items(args, "REDUCE arguments")?;
                let node = self.call(func, &args)?;
                self.push(node)?
            }
            NEWOBJ => {
                let args = self.pop()?;
                let cls = self.pop()?;
                let args = self.tuple_items(args, "NEWOBJ arguments")?;
                let node = self.new_object(cls, &args)?;
                self.push(node)?
            }
            NEWOBJ_EX => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                match &self.nodes[kwargs] {
                    Node::Dict(d) if d.is_empty() => {}
                    _ => {
                        return Err(Error::Forbidden(
                            "NEWOBJ_EX with keyword arguments is not allowed".into(),
                        ));
                    }
                }
                let args = self.tuple_items(args, "NEWOBJ_EX arguments")?;
                let node = self.new_object(cls, &args)?;
                self.push(node)?
            }
            INST => {
                let module = self.line_str()?;
                let name = self.line_str()?;
                let cls = resolve_global(module, name)?;
                let args = self.pop_mark()?;
                let cls = self.alloc(Node::Leaf(cls))?;
                let node = self.call(cls, &args)?;
                self.push(node)?
            }
            OBJ => {
                let items = self.pop_mark()?;
                let (&cls, args) = items
                    .split_first()
                    .ok_or_else(|| err("OBJ without a class"))?;
                let node = self.call(cls, args)?;
                self.push(node)?
            }
            BUILD => {
                let _state = self.pop()?;
                let inst = self.top()?;
                match &self.nodes[inst] {
                    // Tensor attributes and the `_metadata` of a state dict are not
                    // data kiln needs: they are dropped.
                    Node::Leaf(Value::Tensor(_)) | Node::OrderedDict(_) => {}
                    Node::Leaf(v) => {
                        return Err(Error::Forbidden(format!(
                            "BUILD on {} is not allowed",
                            describe(v)
                        )));
                    }
                    other => {
                        return Err(Error::Forbidden(format!(
                            "BUILD on a {} is not allowed",
                            node_type(other)
                        )));
                    }
                }
            }
            BINPERSID => {
                let pid = self.pop()?;
                let storage = self.persistent_load(pid)?;
                self.push_value(Value::Storage(Box::new(storage)))?
            }
            PERSID => {
                return Err(Error::Unsupported(
                    "text persistent ids (PERSID): not a torch zip checkpoint".into(),
                ));
            }
            EXT1 | EXT2 | EXT4 => {
                return Err(Error::Forbidden(format!(
                    "extension registry opcode {} is not allowed",
                    ops::name(op)
                )));
            }
            NEXT_BUFFER | READONLY_BUFFER => {
                return Err(Error::Unsupported(format!(
                    "out-of-band buffers ({})",
                    ops::name(op)
                )));
            }
            other => {
                return Err(err(format!("unknown opcode 0x{other:02x}")));
            }
        }
        Ok(true)
    }

    fn push_utf8(&mut self, n: u64) -> Result<()> {
        let bytes = self.take_len(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| err("invalid UTF-8 in a string"))?;
        self.push_value(Value::String(s.to_string()))
    }

    fn extend_list(&mut self, list: Id, items: &[Id]) -> Result<()> {
        match &mut self.nodes[list] {
            Node::List(v) => {
                v.extend_from_slice(items);
                Ok(())
            }
            _ => Err(err("APPEND on something that is not a list")),
        }
    }

    fn extend_dict(&mut self, dict: Id, items: &[Id]) -> Result<()> {
        let new = pairs(items)?;
        match &mut self.nodes[dict] {
            Node::Dict(v) | Node::OrderedDict(v) => {
                v.extend(new);
                Ok(())
            }
            _ => Err(err("SETITEM on something that is not a dict")),
        }
    }

    fn tuple_items(&self, id: Id, what: &str) -> Result<Vec<Id>> {
        match &self.nodes[id] {
            Node::Tuple(items) => Ok(items.clone()),
            other => Err(err(format!(
                "{what} must be a tuple, not a {}",
                node_type(other)
            ))),
        }
    }

    /// The `module.name` of a global on the stack.
    fn global_name(&self, id: Id) -> Option<String> {
        match self.leaf(id) {
            Some(Value::Global { module, name }) => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    /// `REDUCE` (and INST/OBJ): calls one of the allowlisted rebuild functions.
    fn call(&mut self, func: Id, args: &[Id]) -> Result<Node> {
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
    fn new_object(&mut self, cls: Id, args: &[Id]) -> Result<Node> {
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
    fn persistent_load(&self, pid: Id) -> Result<StorageRef> {
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

    // ---- the result ----------------------------------------------------------

    /// Copies the object `id` out of the arena as a tree, without recursion (an
    /// explicit stack of frames), so that depth is bounded by the limit alone.
    fn convert(&self, root: Id, budget: &mut Budget) -> Result<Value> {
        let mut frames: Vec<Frame<'_>> = Vec::new();
        match self.start(root, budget)? {
            Started::Done(v) => return Ok(v),
            Started::Frame(f) => frames.push(f),
        }
        loop {
            let Some(top) = frames.last_mut() else {
                return Err(err("internal: empty conversion stack"));
            };
            if let Some(&child) = top.children.get(top.next) {
                top.next += 1;
                match self.start(child, budget)? {
                    Started::Done(v) => top.out.push(v),
                    Started::Frame(f) => {
                        if frames.len() >= self.limits.max_depth {
                            return Err(err(format!(
                                "nesting deeper than {} (or a recursive structure)",
                                self.limits.max_depth
                            )));
                        }
                        frames.push(f);
                    }
                }
                continue;
            }
            let Some(done) = frames.pop() else {
                return Err(err("internal: empty conversion stack"));
            };
            let v = finish(done);
            match frames.last_mut() {
                Some(parent) => parent.out.push(v),
                None => return Ok(v),
            }
        }
    }

    /// A leaf is copied at once; a container becomes a frame to fill.
    fn start<'n>(&'n self, id: Id, budget: &mut Budget) -> Result<Started<'n>> {
        budget.objects = budget
            .objects
            .checked_sub(1)
            .ok_or_else(|| err(format!("more than {} objects", self.limits.max_objects)))?;
        let (kind, children): (Kind, &'n [Id]) = match &self.nodes[id] {
            Node::Leaf(v) => {
                let n = match v {
                    Value::String(s) => s.len(),
                    Value::Bytes(b) => b.len(),
                    _ => 0,
                };
                budget.bytes = budget
                    .bytes
                    .checked_sub(n)
                    .ok_or_else(|| err("strings too large once shared objects are copied"))?;
                return Ok(Started::Done(v.clone()));
            }
            Node::List(ids) => (Kind::List, ids),
            Node::Tuple(ids) => (Kind::Tuple, ids),
            Node::Set(ids) => (Kind::Set, ids),
            Node::Dict(items) => (Kind::Dict, items),
            Node::OrderedDict(items) => (Kind::OrderedDict, items),
        };
        Ok(Started::Frame(Frame {
            kind,
            children,
            next: 0,
            out: Vec::new(),
        }))
    }
}

#[derive(Clone, Copy)]
enum Kind {
    List,
    Tuple,
    Set,
    Dict,
    OrderedDict,
}

/// A container being copied out: its children, and the values made so far.
struct Frame<'n> {
    kind: Kind,
    children: &'n [Id],
    next: usize,
    out: Vec<Value>,
}

enum Started<'n> {
    Done(Value),
    Frame(Frame<'n>),
}

fn finish(f: Frame<'_>) -> Value {
    match f.kind {
        Kind::List => Value::List(f.out),
        Kind::Tuple => Value::Tuple(f.out),
        Kind::Set => Value::Set(f.out),
        Kind::Dict => Value::Dict(dict_items(f.out)),
        Kind::OrderedDict => Value::OrderedDict(dict_items(f.out)),
    }
}

/// Pairs up a dict's flattened keys and values; a key set twice keeps its first
/// place and its last value, as in Python.
fn dict_items(flat: Vec<Value>) -> Vec<(Value, Value)> {
    let mut out: Vec<(Value, Value)> = Vec::with_capacity(flat.len() / 2);
    let mut seen: HashMap<KeyRepr, usize> = HashMap::new();
    let mut it = flat.into_iter();
    while let (Some(key), Some(value)) = (it.next(), it.next()) {
        match key_repr(&key) {
            Some(r) => match seen.get(&r) {
                Some(&i) => out[i].1 = value,
                None => {
                    seen.insert(r, out.len());
                    out.push((key, value));
                }
            },
            None => out.push((key, value)),
        }
    }
    out
}

/// A hashable stand-in for the dict keys torch files use.
#[derive(Hash, PartialEq, Eq)]
enum KeyRepr {
    Str(String),
    Int(i64),
    None,
}

fn key_repr(v: &Value) -> Option<KeyRepr> {
    match v {
        Value::String(s) => Some(KeyRepr::Str(s.clone())),
        Value::Int(i) => Some(KeyRepr::Int(*i)),
        Value::Bool(b) => Some(KeyRepr::Int(i64::from(*b))),
        Value::None => Some(KeyRepr::None),
        _ => None,
    }
}

/// Dict items from the stack (keys and values alternating).
fn pairs(items: &[Id]) -> Result<Vec<Id>> {
    if !items.len().is_multiple_of(2) {
        return Err(err("odd number of items for a dict"));
    }
    Ok(items.to_vec())
}

fn bad_args(name: &str) -> Error {
    err(format!("unexpected arguments to {name}"))
}

fn unsupported(name: &str, what: &str) -> Error {
    Error::Unsupported(format!("{what} ({name})"))
}

fn node_type(n: &Node) -> &'static str {
    match n {
        Node::Leaf(v) => v.type_name(),
        Node::List(_) => "list",
        Node::Tuple(_) => "tuple",
        Node::Dict(_) => "dict",
        Node::OrderedDict(_) => "OrderedDict",
        Node::Set(_) => "set",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Global { module, name } => format!("{module}.{name}"),
        Value::DType(d) => format!("torch.{}", d.torch_name()),
        other => format!("a {}", other.type_name()),
    }
}

/// A little-endian two's-complement integer (LONG1/LONG4), which must fit in 64 bits.
fn le_signed(bytes: &[u8]) -> Result<i64> {
    if bytes.is_empty() {
        return Ok(0);
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    if bytes.len() > 8 {
        // Beyond 8 bytes, only sign extension is allowed.
        let (low, high) = bytes.split_at(8);
        if high.iter().any(|&b| b != fill) || (low[7] & 0x80 != 0) != negative {
            return Err(Error::Unsupported("integer does not fit in 64 bits".into()));
        }
        return le_signed(low);
    }
    let mut buf = [fill; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(buf))
}

fn parse_int(s: &str) -> Result<i64> {
    s.trim()
        .parse()
        .map_err(|_| err(format!("bad or too large integer {s:?}")))
}

fn parse_index(s: &str) -> Result<u64> {
    s.trim()
        .parse()
        .map_err(|_| err(format!("bad memo index {s:?}")))
}

/// Protocol 0 `STRING`: a Python `repr` of a string, quotes included.
fn unquote_string(line: &[u8]) -> Result<String> {
    let inner = match line {
        [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
        _ => return Err(err("STRING argument is not quoted")),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *inner.get(i).ok_or_else(|| err("bad escape in STRING"))?;
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match inner.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(u8::try_from(v).map_err(|_| err("bad octal escape in STRING"))?);
            }
            b'x' => {
                let h = inner
                    .get(i..i + 2)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| err("bad \\x escape in STRING"))?;
                out.push(h);
                i += 2;
            }
            b'\\' | b'\'' | b'"' => out.push(e),
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    String::from_utf8(out).map_err(|_| err("invalid UTF-8 in STRING"))
}

/// Protocol 0 `UNICODE`: latin-1 text with `\uXXXX` and `\UXXXXXXXX` escapes.
fn raw_unicode_escape(line: &[u8]) -> Result<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        if c == b'\\' && matches!(line.get(i + 1), Some(b'u' | b'U')) {
            let n = if line[i + 1] == b'u' { 4 } else { 8 };
            let code = line
                .get(i + 2..i + 2 + n)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32)
                .ok_or_else(|| err("bad \\u escape in UNICODE"))?;
            out.push(code);
            i += 2 + n;
        } else {
            out.push(char::from(c));
            i += 1;
        }
    }
    Ok(out)
}
