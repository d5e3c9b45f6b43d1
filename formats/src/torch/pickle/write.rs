//! A protocol-2 pickler for [`Value`] trees, writing tensors as torch does
//! (`_rebuild_tensor_v2` with a legacy storage class, or `_rebuild_tensor_v3` with
//! an `UntypedStorage` and a dtype global for float8 and unsigned types).
//!
//! Only protocol-2 opcodes are emitted, since torch's weights-only unpickler knows no
//! others, and only globals on its allowlist.

use std::collections::HashMap;

use super::allowlist::{is_allowed, legacy_storage_name};
use super::ops::*;
use super::value::{StorageRef, TensorRef, Value};
use crate::torch::layout::check_bounds;
use crate::{Error, Result};

/// Deepest nesting the writer accepts (the reader's default limit).
const MAX_DEPTH: usize = 1000;

/// A pickled tree and the storages it refers to.
#[derive(Debug)]
pub(crate) struct Pickled {
    /// The pickle stream.
    pub bytes: Vec<u8>,
    /// The storages in order of first appearance; the stream calls storage `i` by the
    /// key `i.to_string()`. Each keeps the key it had in the tree.
    pub storages: Vec<StorageRef>,
}

/// Pickles `root` with protocol 2, as `torch.save` would.
///
/// Storage keys are renumbered `"0"`, `"1"`, … in order of first appearance, as
/// torch requires; tensors that name the same storage key share one storage.
pub fn dump(root: &Value) -> Result<Vec<u8>> {
    Ok(pickle_tree(root)?.bytes)
}

/// Pickles `root`, renumbering storages; see [`Pickled`].
pub(crate) fn pickle_tree(root: &Value) -> Result<Pickled> {
    let mut p = Pickler {
        out: Vec::with_capacity(1024),
        globals: HashMap::new(),
        memo_len: 0,
        storages: Vec::new(),
        keys: HashMap::new(),
    };
    p.out.extend_from_slice(&[PROTO, 2]);
    p.value(root, 0)?;
    p.out.push(STOP);
    Ok(Pickled {
        bytes: p.out,
        storages: p.storages,
    })
}

/// Work for the writer's explicit stack.
enum Task<'v> {
    /// Write a value.
    Value(&'v Value, usize),
    /// Write these opcodes (the end of a container).
    Op(&'static [u8]),
}

struct Pickler {
    out: Vec<u8>,
    /// Memo slots of globals already written.
    globals: HashMap<(String, String), u32>,
    memo_len: u32,
    storages: Vec<StorageRef>,
    /// Original key → (new index, dtype of the tensors viewing it).
    keys: HashMap<String, (usize, Option<crate::DType>)>,
}

impl Pickler {
    /// Writes `root` without recursion: containers push their items and closing
    /// opcodes on an explicit stack of tasks.
    fn value(&mut self, root: &Value, depth: usize) -> Result<()> {
        let mut tasks: Vec<Task<'_>> = vec![Task::Value(root, depth)];
        while let Some(task) = tasks.pop() {
            let (v, depth) = match task {
                Task::Op(ops) => {
                    self.out.extend_from_slice(ops);
                    continue;
                }
                Task::Value(v, depth) => (v, depth),
            };
            let children = depth + 1;
            let deep = || {
                Error::Pickle(format!(
                    "cannot write objects nested deeper than {MAX_DEPTH}"
                ))
            };
            match v {
                Value::List(items) | Value::Set(items) => {
                    if children > MAX_DEPTH {
                        return Err(deep());
                    }
                    if matches!(v, Value::Set(_)) {
                        // set([...])
                        self.global("builtins", "set")?;
                        tasks.push(Task::Op(&[TUPLE1, REDUCE]));
                    }
                    self.out.push(EMPTY_LIST);
                    if !items.is_empty() {
                        self.out.push(MARK);
                        tasks.push(Task::Op(&[APPENDS]));
                        tasks.extend(items.iter().rev().map(|i| Task::Value(i, children)));
                    }
                }
                Value::Tuple(items) => {
                    if children > MAX_DEPTH {
                        return Err(deep());
                    }
                    match items.len() {
                        0 => self.out.push(EMPTY_TUPLE),
                        n @ 1..=3 => tasks.push(Task::Op(match n {
                            1 => &[TUPLE1],
                            2 => &[TUPLE2],
                            _ => &[TUPLE3],
                        })),
                        _ => {
                            self.out.push(MARK);
                            tasks.push(Task::Op(&[TUPLE]));
                        }
                    }
                    tasks.extend(items.iter().rev().map(|i| Task::Value(i, children)));
                }
                Value::Dict(items) | Value::OrderedDict(items) => {
                    if children > MAX_DEPTH {
                        return Err(deep());
                    }
                    if matches!(v, Value::Dict(_)) {
                        self.out.push(EMPTY_DICT);
                    } else {
                        self.global("collections", "OrderedDict")?;
                        self.out.extend_from_slice(&[EMPTY_TUPLE, REDUCE]);
                    }
                    if !items.is_empty() {
                        self.out.push(MARK);
                        tasks.push(Task::Op(&[SETITEMS]));
                        for (k, v) in items.iter().rev() {
                            tasks.push(Task::Value(v, children));
                            tasks.push(Task::Value(k, children));
                        }
                    }
                }
                leaf => self.leaf(leaf)?,
            }
        }
        Ok(())
    }

    /// Writes a value that holds no other values.
    fn leaf(&mut self, v: &Value) -> Result<()> {
        match v {
            Value::None => self.out.push(NONE),
            Value::Bool(b) => self.out.push(if *b { NEWTRUE } else { NEWFALSE }),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => self.float(*f),
            Value::Complex(re, im) => {
                self.global("builtins", "complex")?;
                self.float(*re);
                self.float(*im);
                self.out.extend_from_slice(&[TUPLE2, REDUCE]);
            }
            Value::String(s) => self.string(s),
            Value::Bytes(b) => {
                // Protocol 2 has no bytes opcode: `_codecs.encode(latin1_str, 'latin1')`.
                self.global("_codecs", "encode")?;
                let text: String = b.iter().map(|&c| char::from(c)).collect();
                self.string(&text);
                self.string("latin1");
                self.out.extend_from_slice(&[TUPLE2, REDUCE]);
            }
            Value::Tensor(t) => self.tensor(t)?,
            Value::Storage(s) => {
                let dtype = s.dtype;
                self.persistent_id(s, dtype, dtype.is_some())?;
            }
            Value::DType(d) => self.global("torch", d.torch_name())?,
            Value::Device(d) => {
                self.global("torch", "device")?;
                self.string(d);
                self.out.extend_from_slice(&[TUPLE1, REDUCE]);
            }
            Value::Global { module, name } => self.global(module, name)?,
            Value::List(_)
            | Value::Tuple(_)
            | Value::Set(_)
            | Value::Dict(_)
            | Value::OrderedDict(_) => self.value(v, 0)?,
        }
        Ok(())
    }

    fn float(&mut self, f: f64) {
        self.out.push(BINFLOAT);
        self.out.extend_from_slice(&f.to_be_bytes());
    }

    /// A tuple of ints (a tensor's size or stride).
    fn int_tuple(&mut self, items: &[i64]) {
        match items.len() {
            0 => self.out.push(EMPTY_TUPLE),
            n @ 1..=3 => {
                for &i in items {
                    self.int(i);
                }
                self.out.push(TUPLE1 + (n as u8 - 1));
            }
            _ => {
                self.out.push(MARK);
                for &i in items {
                    self.int(i);
                }
                self.out.push(TUPLE);
            }
        }
    }

    /// Minimal integer encoding: `K`, `M`, `J`, else `LONG1`.
    fn int(&mut self, i: i64) {
        if (0..=0xff).contains(&i) {
            self.out.extend_from_slice(&[BININT1, i as u8]);
        } else if (0..=0xffff).contains(&i) {
            self.out.push(BININT2);
            self.out.extend_from_slice(&(i as u16).to_le_bytes());
        } else if let Ok(j) = i32::try_from(i) {
            self.out.push(BININT);
            self.out.extend_from_slice(&j.to_le_bytes());
        } else {
            let bytes = i.to_le_bytes();
            // Drop high bytes that are pure sign extension.
            let mut n = 8;
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[LONG1, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    /// `GLOBAL module name`, memoized so that later uses are a `BINGET`.
    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        if !is_allowed(module, name) {
            return Err(Error::Forbidden(format!(
                "{module}.{name} is not on torch's weights-only allowlist; \
                 torch.load(weights_only=True) would refuse the file"
            )));
        }
        if let Some(&slot) = self.globals.get(&(module.to_string(), name.to_string())) {
            self.get(slot);
            return Ok(());
        }
        self.out.push(GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        let slot = self.memo_len;
        self.put(slot);
        self.memo_len += 1;
        self.globals
            .insert((module.to_string(), name.to_string()), slot);
        Ok(())
    }

    fn put(&mut self, slot: u32) {
        match u8::try_from(slot) {
            Ok(s) => self.out.extend_from_slice(&[BINPUT, s]),
            Err(_) => {
                self.out.push(LONG_BINPUT);
                self.out.extend_from_slice(&slot.to_le_bytes());
            }
        }
    }

    fn get(&mut self, slot: u32) {
        match u8::try_from(slot) {
            Ok(s) => self.out.extend_from_slice(&[BINGET, s]),
            Err(_) => {
                self.out.push(LONG_BINGET);
                self.out.extend_from_slice(&slot.to_le_bytes());
            }
        }
    }

    /// `('storage', storage_type, key, 'cpu', numel)` then `BINPERSID`.
    ///
    /// `view_dtype` is the dtype of the tensor viewing the storage (the storage's own
    /// dtype for a bare storage); `typed` chooses the legacy storage class.
    fn persistent_id(
        &mut self,
        s: &StorageRef,
        view_dtype: Option<crate::DType>,
        typed: bool,
    ) -> Result<()> {
        let next = self.storages.len();
        let (index, first_dtype) = *self.keys.entry(s.key.clone()).or_insert((next, view_dtype));
        if index == next {
            self.storages.push(s.clone());
        } else {
            let first = &self.storages[index];
            if first.nbytes != s.nbytes {
                return Err(Error::Tensor(format!(
                    "storage {:?} is {} bytes in one place and {} in another",
                    s.key, first.nbytes, s.nbytes
                )));
            }
            if first_dtype != view_dtype {
                return Err(Error::Tensor(format!(
                    "storage {:?} is viewed as different dtypes, which torch cannot load",
                    s.key
                )));
            }
        }
        let (class_module, class_name, numel) = match view_dtype.filter(|_| typed) {
            Some(d) => {
                let name = legacy_storage_name(d).ok_or_else(|| {
                    Error::Tensor(format!("{} has no typed storage class", d.torch_name()))
                })?;
                let size = d.size() as u64;
                if !s.nbytes.is_multiple_of(size) {
                    return Err(Error::Tensor(format!(
                        "storage {:?} of {} bytes is not a whole number of {} elements",
                        s.key,
                        s.nbytes,
                        d.torch_name()
                    )));
                }
                ("torch", name, s.nbytes / size)
            }
            None => ("torch.storage", "UntypedStorage", s.nbytes),
        };
        let numel = i64::try_from(numel)
            .map_err(|_| Error::Tensor(format!("storage {:?} too large", s.key)))?;
        self.out.push(MARK);
        self.string("storage");
        self.global(class_module, class_name)?;
        self.string(&index.to_string());
        self.string("cpu");
        self.int(numel);
        self.out.extend_from_slice(&[TUPLE, BINPERSID]);
        Ok(())
    }

    fn tensor(&mut self, t: &TensorRef) -> Result<()> {
        check_bounds(t, t.storage.nbytes)?;
        let v3 = legacy_storage_name(t.dtype).is_none();
        let rebuild = if v3 {
            "_rebuild_tensor_v3"
        } else {
            "_rebuild_tensor_v2"
        };
        self.global("torch._utils", rebuild)?;
        self.out.push(MARK);
        self.persistent_id(&t.storage, Some(t.dtype), !v3)?;
        let to_i64 = |x: u64| {
            i64::try_from(x).map_err(|_| Error::Tensor(format!("dimension {x} too large")))
        };
        self.int(to_i64(t.offset)?);
        for dims in [&t.shape, &t.stride] {
            let ints = dims
                .iter()
                .map(|&d| to_i64(d as u64))
                .collect::<Result<Vec<_>>>()?;
            self.int_tuple(&ints);
        }
        self.out
            .push(if t.requires_grad { NEWTRUE } else { NEWFALSE });
        // backward_hooks: OrderedDict()
        self.global("collections", "OrderedDict")?;
        self.out.extend_from_slice(&[EMPTY_TUPLE, REDUCE]);
        if v3 {
            self.global("torch", t.dtype.torch_name())?;
        }
        self.out.extend_from_slice(&[TUPLE, REDUCE]);
        Ok(())
    }
}
