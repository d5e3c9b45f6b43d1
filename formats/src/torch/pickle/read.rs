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

use super::allowlist::resolve_global;
use super::ops::{self, *};
use super::text::{parse_index, parse_int, raw_unicode_escape, unquote_string};
use super::value::Value;
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

pub(super) type Id = usize;

/// An object in the arena: a leaf value, or a container of other objects.
#[derive(Debug)]
pub(super) enum Node {
    Leaf(Value),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    /// Keys and values, flattened: `k0, v0, k1, v1, …`.
    Dict(Vec<Id>),
    /// As `Dict`.
    OrderedDict(Vec<Id>),
    Set(Vec<Id>),
}

pub(super) struct Budget {
    pub(super) objects: usize,
    pub(super) bytes: usize,
}

pub(super) struct Vm<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    pub(super) nodes: Vec<Node>,
    pub(super) stack: Vec<Id>,
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u64, Id>,
    pub(super) limits: Limits,
}

pub(super) fn err(msg: impl Into<String>) -> Error {
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

    pub(super) fn alloc(&mut self, node: Node) -> Result<Id> {
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

    pub(super) fn leaf(&self, id: Id) -> Option<&Value> {
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

    pub(super) fn tuple_items(&self, id: Id, what: &str) -> Result<Vec<Id>> {
        match &self.nodes[id] {
            Node::Tuple(items) => Ok(items.clone()),
            other => Err(err(format!(
                "{what} must be a tuple, not a {}",
                node_type(other)
            ))),
        }
    }

    /// The `module.name` of a global on the stack.
    pub(super) fn global_name(&self, id: Id) -> Option<String> {
        match self.leaf(id) {
            Some(Value::Global { module, name }) => Some(format!("{module}.{name}")),
            _ => None,
        }
    }
}

/// Dict items from the stack (keys and values alternating).
fn pairs(items: &[Id]) -> Result<Vec<Id>> {
    if !items.len().is_multiple_of(2) {
        return Err(err("odd number of items for a dict"));
    }
    Ok(items.to_vec())
}

pub(super) fn node_type(n: &Node) -> &'static str {
    match n {
        Node::Leaf(v) => v.type_name(),
        Node::List(_) => "list",
        Node::Tuple(_) => "tuple",
        Node::Dict(_) => "dict",
        Node::OrderedDict(_) => "OrderedDict",
        Node::Set(_) => "set",
    }
}

pub(super) fn describe(v: &Value) -> String {
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
