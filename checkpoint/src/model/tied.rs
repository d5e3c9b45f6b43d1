//! Tied weights: checking the ties a caller declares against the tensors it hands over
//! (and finding tensors that share memory without being declared tied), and the views
//! that leave a tied name out for saving or add it back, reading its source, on load.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_formats::{Format, TensorCollection, TensorInfo, TensorView};

use crate::{Error, Result};

/// The declared ties, checked: each tied name appears once, is not its own source, and
/// its source is not itself tied (ties are one level deep, as in transformers).
#[derive(Debug, Default)]
pub(super) struct Ties {
    /// tied name → source name.
    source: HashMap<String, String>,
    /// Every name in a tie (tied names and sources) → the source of its group.
    group: HashMap<String, String>,
}

impl Ties {
    /// Checks the shape of the declaration itself (not the tensors).
    pub(super) fn new(pairs: &[(String, String)]) -> Result<Ties> {
        let mut ties = Ties::default();
        for (tied, src) in pairs {
            if tied == src {
                return Err(Error::Invalid(format!(
                    "tensor {tied:?} is declared tied to itself"
                )));
            }
            if ties.source.insert(tied.clone(), src.clone()).is_some() {
                return Err(Error::Invalid(format!(
                    "tensor {tied:?} is declared tied twice"
                )));
            }
        }
        for (tied, src) in &ties.source {
            if ties.source.contains_key(src) {
                return Err(Error::Invalid(format!(
                    "tensor {tied:?} is tied to {src:?}, which is itself tied; tie it to the source"
                )));
            }
            ties.group.insert(tied.clone(), src.clone());
            ties.group.insert(src.clone(), src.clone());
        }
        Ok(ties)
    }

    /// Whether `name` is a tied (not source) name.
    pub(super) fn is_tied(&self, name: &str) -> bool {
        self.source.contains_key(name)
    }

    /// The source `name` is tied to, if it is a tied name.
    pub(super) fn source_of(&self, name: &str) -> Option<&str> {
        self.source.get(name).map(String::as_str)
    }

    /// The tie pairs (tied, source), in name order.
    pub(super) fn pairs(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<_> = self
            .source
            .iter()
            .map(|(t, s)| (t.as_str(), s.as_str()))
            .collect();
        v.sort_unstable();
        v
    }

    /// The members of `name`'s tie group other than `name`, source first; empty if
    /// `name` is in no tie.
    pub(super) fn partners(&self, name: &str) -> Vec<&str> {
        let Some(src) = self.group.get(name) else {
            return Vec::new();
        };
        let mut v = vec![src.as_str()];
        let mut tied: Vec<&str> = self
            .source
            .iter()
            .filter(|(_, s)| *s == src)
            .map(|(t, _)| t.as_str())
            .collect();
        tied.sort_unstable();
        v.extend(tied);
        v.retain(|n| *n != name);
        v
    }

    fn same_group(&self, a: &str, b: &str) -> bool {
        matches!((self.group.get(a), self.group.get(b)), (Some(x), Some(y)) if x == y)
    }
}

/// Checks the weights handed to a save against the declared ties:
///
/// - every source is among the weights;
/// - a tied name that is among the weights has its source's dtype, shape and bytes;
/// - no two tensors share memory unless they are one tie (the same bytes, lent twice).
///
/// Sharing is found from the addresses of the bytes the collection lends: two names
/// whose borrowed `data()` ranges overlap alias each other. Only borrowed views count:
/// a borrowed slice stays where it is for as long as the collection is borrowed, while
/// an owned copy is a fresh allocation (so it aliases nothing, and its address may be
/// reused by the next copy).
pub(super) fn check_save(weights: &dyn TensorCollection, ties: &Ties) -> Result<()> {
    for (tied, src) in ties.pairs() {
        let Some(src_info) = weights.info(src) else {
            return Err(Error::Invalid(format!(
                "tensor {tied:?} is declared tied to {src:?}, which is not among the weights"
            )));
        };
        let Some(tied_info) = weights.info(tied) else {
            continue;
        };
        if tied_info.shape != src_info.shape {
            return Err(Error::Shape {
                name: tied.to_string(),
                expected: src_info.shape.clone(),
                found: tied_info.shape.clone(),
            });
        }
        if tied_info.dtype != src_info.dtype {
            return Err(Error::Invalid(format!(
                "tensor {tied:?} is {} but its tie source {src:?} is {}",
                tied_info.dtype, src_info.dtype
            )));
        }
        if weights.tensor(tied)?.data() != weights.tensor(src)?.data() {
            return Err(Error::Invalid(format!(
                "tensor {tied:?} is declared tied to {src:?} but holds different values"
            )));
        }
    }

    // (start, end, index into tensors()) of every borrowed, non-empty view.
    let infos = weights.tensors();
    let mut ranges = Vec::with_capacity(infos.len());
    for (i, info) in infos.iter().enumerate() {
        let view = weights.tensor(&info.name)?;
        if view.is_borrowed() && !view.data().is_empty() {
            let range = view.data().as_ptr_range();
            ranges.push((range.start as usize, range.end as usize, i));
        }
    }
    ranges.sort_unstable();
    for (k, &(start, end, i)) in ranges.iter().enumerate() {
        for &(s2, e2, j) in ranges[k + 1..].iter().take_while(|r| r.0 < end) {
            let (a, b) = (&infos[i].name, &infos[j].name);
            let same_tie = ties.same_group(a, b) && (start, end) == (s2, e2);
            if !same_tie {
                let (a, b) = if a < b { (a, b) } else { (b, a) };
                return Err(Error::Invalid(format!(
                    "tensors {a:?} and {b:?} share memory but are not declared tied; \
                     declare the tie or pass separate copies"
                )));
            }
        }
    }
    Ok(())
}

/// A selection of another collection's tensors, possibly under other names: what a
/// save writes (without the tied names, or with absent tied names added) and what a
/// load returns (with re-tied names reading their source).
pub(super) struct Selection<'a> {
    inner: Inner<'a>,
    infos: Vec<TensorInfo>,
    /// name in this view → (index into `infos`, name in `inner`).
    read: HashMap<String, (usize, String)>,
    metadata: BTreeMap<String, String>,
}

/// The collection a [`Selection`] reads from.
pub(super) enum Inner<'a> {
    /// The caller's weights, for a save.
    Borrowed(&'a dyn TensorCollection),
    /// The opened files, for a load.
    Owned(Box<dyn TensorCollection>),
}

impl Inner<'_> {
    fn get(&self) -> &dyn TensorCollection {
        match self {
            Inner::Borrowed(c) => *c,
            Inner::Owned(c) => c.as_ref(),
        }
    }
}

impl<'a> Selection<'a> {
    pub(super) fn new(inner: Inner<'a>, metadata: BTreeMap<String, String>) -> Self {
        Selection {
            inner,
            infos: Vec::new(),
            read: HashMap::new(),
            metadata,
        }
    }

    /// Lists `info` (a name of this view), read from `from` in the inner collection.
    pub(super) fn push(&mut self, info: TensorInfo, from: &str) {
        self.read
            .insert(info.name.clone(), (self.infos.len(), from.to_string()));
        self.infos.push(info);
    }
}

impl TensorCollection for Selection<'_> {
    fn format(&self) -> Option<Format> {
        self.inner.get().format()
    }

    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    fn tensor(&self, name: &str) -> kiln_formats::Result<TensorView<'_>> {
        match self.read.get(name) {
            Some((_, from)) => self.inner.get().tensor(from),
            None => Err(kiln_formats::Error::NotFound(name.to_string())),
        }
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.read.get(name).map(|(i, _)| &self.infos[*i])
    }

    /// Verifies the inner collection whole (shard index, CRCs, …), then this view.
    fn verify(&self) -> kiln_formats::Result<()> {
        self.inner.get().verify()?;
        for info in &self.infos {
            let t = self.tensor(&info.name)?;
            if t.dtype() != info.dtype || t.shape() != info.shape.as_slice() {
                return Err(kiln_formats::Error::Tensor(format!(
                    "{}: read {} {:?}, expected {} {:?}",
                    info.name,
                    t.dtype(),
                    t.shape(),
                    info.dtype,
                    info.shape
                )));
            }
        }
        Ok(())
    }
}

/// Names listed once each, for building selections.
pub(super) fn name_set(infos: &[TensorInfo]) -> HashSet<&str> {
    infos.iter().map(|i| i.name.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::{DType, TensorMap};

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn partners_put_the_source_first() {
        let ties = Ties::new(&pairs(&[("lm_head.weight", "wte"), ("out.weight", "wte")])).unwrap();
        assert_eq!(ties.partners("lm_head.weight"), ["wte", "out.weight"]);
        assert_eq!(ties.partners("wte"), ["lm_head.weight", "out.weight"]);
        assert!(ties.partners("other").is_empty());
        assert!(ties.is_tied("out.weight") && !ties.is_tied("wte"));
    }

    /// A collection that hands out a fresh owned copy on every read (as a strided
    /// PyTorch tensor is read): the allocator may reuse one copy's address for the next,
    /// which must not be taken for aliasing.
    struct Copying(TensorMap<'static>);

    impl TensorCollection for Copying {
        fn format(&self) -> Option<Format> {
            None
        }
        fn metadata(&self) -> &BTreeMap<String, String> {
            self.0.metadata()
        }
        fn tensors(&self) -> &[TensorInfo] {
            self.0.tensors()
        }
        fn tensor(&self, name: &str) -> kiln_formats::Result<TensorView<'_>> {
            Ok(self.0.tensor(name)?.into_owned())
        }
    }

    #[test]
    fn owned_copies_are_not_aliases() {
        let mut m = TensorMap::new();
        for name in ["a", "b", "c"] {
            let v = TensorView::new(DType::F32, vec![4], vec![name.as_bytes()[0]; 16]).unwrap();
            m.insert(name, v).unwrap();
        }
        check_save(&Copying(m), &Ties::default()).unwrap();
    }
}
