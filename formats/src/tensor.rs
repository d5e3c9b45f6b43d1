//! The format-independent view of tensors and collections of them.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::{DType, Error, Format, Result};

/// Number of elements of a shape, or `None` if it overflows `usize`.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Number of bytes of a tensor of this dtype and shape, or `None` on overflow.
pub(crate) fn checked_nbytes(dtype: DType, shape: &[usize]) -> Option<usize> {
    checked_numel(shape)?.checked_mul(dtype.size())
}

/// A tensor's name, dtype and shape: what a collection knows before reading any data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    /// The tensor's name (`"bert.embeddings.word_embeddings.weight"`).
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape; empty for a 0-d (scalar) tensor.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements (1 for a 0-d tensor, 0 for an empty one).
    ///
    /// Collections validate shapes when they open, so this cannot overflow for a
    /// `TensorInfo` that came from one.
    pub fn numel(&self) -> usize {
        checked_numel(&self.shape).unwrap_or(usize::MAX)
    }

    /// Number of bytes of the tensor's contiguous data.
    pub fn nbytes(&self) -> usize {
        checked_nbytes(self.dtype, &self.shape).unwrap_or(usize::MAX)
    }
}

/// A contiguous, row-major, little-endian tensor: dtype, shape and bytes.
///
/// The bytes are borrowed (zero-copy from a memory-mapped file) where the file's layout
/// allows, and owned where they had to be rearranged (a strided view in a PyTorch file).
#[derive(Clone, PartialEq, Eq)]
pub struct TensorView<'a> {
    dtype: DType,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl std::fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorView")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl<'a> TensorView<'a> {
    /// A view of `data` as a tensor of `dtype` and `shape`; the length must match.
    pub fn new(dtype: DType, shape: Vec<usize>, data: impl Into<Cow<'a, [u8]>>) -> Result<Self> {
        let data = data.into();
        let expected = checked_nbytes(dtype, &shape)
            .ok_or_else(|| Error::Tensor(format!("shape {shape:?} overflows")))?;
        if expected != data.len() {
            return Err(Error::Tensor(format!(
                "{dtype} {shape:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        Ok(TensorView { dtype, shape, data })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The bytes, little-endian, row-major.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// Whether the bytes are borrowed from the file rather than copied.
    pub fn is_borrowed(&self) -> bool {
        matches!(self.data, Cow::Borrowed(_))
    }

    /// A view that owns its bytes.
    pub fn into_owned(self) -> TensorView<'static> {
        TensorView {
            dtype: self.dtype,
            shape: self.shape,
            data: Cow::Owned(self.data.into_owned()),
        }
    }

    /// Takes the bytes, copying them only if they were borrowed.
    pub fn into_data(self) -> Cow<'a, [u8]> {
        self.data
    }
}

impl safetensors::View for TensorView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.into()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A readable collection of named tensors: one file, a sharded set, or a model folder.
///
/// Opening a collection reads only its header (or index, or pickle); [`tensor`]
/// reads one tensor's bytes when asked.
///
/// [`tensor`]: TensorCollection::tensor
pub trait TensorCollection: Send + Sync {
    /// The Hugging Face weights format the tensors are stored in (`None` for tensors in
    /// memory, and for a GGUF file, which no `from_pretrained` folder holds as weights).
    fn format(&self) -> Option<Format>;

    /// The format's lower-case name for people (`safetensors`, `pytorch`, `gguf`;
    /// `memory` for tensors in memory).
    fn format_name(&self) -> &'static str {
        self.format().map(Format::name).unwrap_or("memory")
    }

    /// String metadata (safetensors' `__metadata__`; empty for PyTorch files).
    fn metadata(&self) -> &BTreeMap<String, String>;

    /// Every tensor, in the order the collection stores them.
    fn tensors(&self) -> &[TensorInfo];

    /// Reads one tensor.
    fn tensor(&self, name: &str) -> Result<TensorView<'_>>;

    /// The description of one tensor.
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors().iter().find(|t| t.name == name)
    }

    /// Reads every byte and checks everything checkable (structure, CRCs, lengths).
    fn verify(&self) -> Result<()> {
        for info in self.tensors() {
            let t = self.tensor(&info.name)?;
            if t.dtype() != info.dtype || t.shape() != info.shape.as_slice() {
                return Err(Error::Tensor(format!(
                    "{}: read {} {:?}, header says {} {:?}",
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

    /// Total number of elements over all tensors.
    fn parameter_count(&self) -> u64 {
        self.tensors().iter().map(|t| t.numel() as u64).sum()
    }

    /// Total bytes of tensor data.
    fn total_bytes(&self) -> u64 {
        self.tensors().iter().map(|t| t.nbytes() as u64).sum()
    }
}

/// Named tensors in memory, in insertion order: what a program hands to a writer.
///
/// ```
/// use kiln_formats::{DType, TensorMap, TensorView, TensorCollection};
/// let mut map = TensorMap::new();
/// map.insert("w", TensorView::new(DType::F32, vec![2], vec![0u8; 8])?)?;
/// map.set_metadata("format", "pt");
/// assert_eq!(map.tensors()[0].name, "w");
/// # Ok::<(), kiln_formats::Error>(())
/// ```
#[derive(Debug, Default, Clone)]
pub struct TensorMap<'a> {
    infos: Vec<TensorInfo>,
    views: Vec<TensorView<'a>>,
    index: std::collections::HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl<'a> TensorMap<'a> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor at the end; a name already present is an error.
    pub fn insert(&mut self, name: impl Into<String>, view: TensorView<'a>) -> Result<()> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(Error::Tensor(format!("duplicate tensor name {name:?}")));
        }
        self.index.insert(name.clone(), self.infos.len());
        self.infos.push(TensorInfo {
            name,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
        });
        self.views.push(view);
        Ok(())
    }

    /// Sets one metadata entry.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// Replaces all metadata.
    pub fn with_metadata(mut self, metadata: BTreeMap<String, String>) -> Self {
        self.metadata = metadata;
        self
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
}

impl TensorCollection for TensorMap<'_> {
    fn format(&self) -> Option<Format> {
        None
    }

    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let v = &self.views[i];
        Ok(TensorView {
            dtype: v.dtype,
            shape: v.shape.clone(),
            data: Cow::Borrowed(&v.data),
        })
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.infos[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_checks_length() {
        assert!(TensorView::new(DType::F32, vec![2, 3], vec![0u8; 24]).is_ok());
        assert!(TensorView::new(DType::F32, vec![2, 3], vec![0u8; 23]).is_err());
        assert!(TensorView::new(DType::F32, vec![usize::MAX, 2], vec![]).is_err());
        let scalar = TensorView::new(DType::I64, vec![], vec![0u8; 8]).unwrap();
        assert_eq!(scalar.numel(), 1);
    }
}
