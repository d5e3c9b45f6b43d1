//! Copying the finished object graph out of the reader's arena as a [`Value`] tree,
//! without recursion and within the [`Limits`](super::Limits).

use std::collections::HashMap;

use super::read::{Budget, Id, Node, Vm, err};
use super::value::Value;
use crate::Result;

impl Vm<'_> {
    /// Copies the object `id` out of the arena as a tree, without recursion (an
    /// explicit stack of frames), so that depth is bounded by the limit alone.
    pub(super) fn convert(&self, root: Id, budget: &mut Budget) -> Result<Value> {
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
