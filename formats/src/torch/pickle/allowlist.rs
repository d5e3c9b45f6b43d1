//! The weights-only allowlist: which globals a pickle may name, as in torch's
//! `torch/_weights_only_unpickler.py` (`_get_allowed_globals`, torch 2.15).
//!
//! A global outside this list is refused with [`Error::Forbidden`] the moment the
//! pickle names it; nothing is ever imported or called.

use super::value::Value;
use crate::{DType, Error, Result};

/// Modules torch refuses even when a user allowlists them.
const BLOCKED_MODULES: [&str; 4] = ["sys", "os", "posix", "nt"];

/// Every global torch 2.15's weights-only unpickler accepts by default, sorted.
const ALLOWED: &[&str] = &[
    "_codecs.encode",
    "builtins.bytearray",
    "builtins.complex",
    "builtins.set",
    "collections.Counter",
    "collections.OrderedDict",
    "torch.BFloat16Storage",
    "torch.BFloat16Tensor",
    "torch.BoolStorage",
    "torch.BoolTensor",
    "torch.ByteStorage",
    "torch.ByteTensor",
    "torch.CharStorage",
    "torch.CharTensor",
    "torch.ComplexDoubleStorage",
    "torch.ComplexFloatStorage",
    "torch.DoubleStorage",
    "torch.DoubleTensor",
    "torch.FloatStorage",
    "torch.FloatTensor",
    "torch.HalfStorage",
    "torch.HalfTensor",
    "torch.IntStorage",
    "torch.IntTensor",
    "torch.LongStorage",
    "torch.LongTensor",
    "torch.QInt32Storage",
    "torch.QInt8Storage",
    "torch.QUInt2x4Storage",
    "torch.QUInt4x2Storage",
    "torch.QUInt8Storage",
    "torch.ShortStorage",
    "torch.ShortTensor",
    "torch.Size",
    "torch.Tensor",
    "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_wrapper_subclass",
    "torch.bcomplex32",
    "torch.bfloat16",
    "torch.bits16",
    "torch.bits1x8",
    "torch.bits2x4",
    "torch.bits4x2",
    "torch.bits8",
    "torch.bool",
    "torch.complex128",
    "torch.complex32",
    "torch.complex64",
    "torch.cuda.BFloat16Storage",
    "torch.cuda.BFloat16Tensor",
    "torch.cuda.BoolStorage",
    "torch.cuda.BoolTensor",
    "torch.cuda.ByteStorage",
    "torch.cuda.ByteTensor",
    "torch.cuda.CharStorage",
    "torch.cuda.CharTensor",
    "torch.cuda.ComplexDoubleStorage",
    "torch.cuda.ComplexFloatStorage",
    "torch.cuda.DoubleStorage",
    "torch.cuda.DoubleTensor",
    "torch.cuda.FloatStorage",
    "torch.cuda.FloatTensor",
    "torch.cuda.HalfStorage",
    "torch.cuda.HalfTensor",
    "torch.cuda.IntStorage",
    "torch.cuda.IntTensor",
    "torch.cuda.LongStorage",
    "torch.cuda.LongTensor",
    "torch.cuda.ShortStorage",
    "torch.cuda.ShortTensor",
    "torch.cuda.sparse.BFloat16Tensor",
    "torch.cuda.sparse.ByteTensor",
    "torch.cuda.sparse.CharTensor",
    "torch.cuda.sparse.DoubleTensor",
    "torch.cuda.sparse.FloatTensor",
    "torch.cuda.sparse.HalfTensor",
    "torch.cuda.sparse.IntTensor",
    "torch.cuda.sparse.LongTensor",
    "torch.cuda.sparse.ShortTensor",
    "torch.device",
    "torch.float16",
    "torch.float32",
    "torch.float4_e2m1fn_x2",
    "torch.float64",
    "torch.float8_e4m3fn",
    "torch.float8_e4m3fnuz",
    "torch.float8_e5m2",
    "torch.float8_e5m2fnuz",
    "torch.float8_e8m0fnu",
    "torch.int1",
    "torch.int16",
    "torch.int2",
    "torch.int3",
    "torch.int32",
    "torch.int4",
    "torch.int5",
    "torch.int6",
    "torch.int64",
    "torch.int7",
    "torch.int8",
    "torch.nn.parameter.Parameter",
    "torch.per_channel_affine",
    "torch.per_channel_affine_float_qparams",
    "torch.per_channel_symmetric",
    "torch.per_tensor_affine",
    "torch.per_tensor_symmetric",
    "torch.qint32",
    "torch.qint8",
    "torch.quint2x4",
    "torch.quint4x2",
    "torch.quint8",
    "torch.serialization._get_layout",
    "torch.sparse.BFloat16Tensor",
    "torch.sparse.ByteTensor",
    "torch.sparse.CharTensor",
    "torch.sparse.DoubleTensor",
    "torch.sparse.FloatTensor",
    "torch.sparse.HalfTensor",
    "torch.sparse.IntTensor",
    "torch.sparse.LongTensor",
    "torch.sparse.ShortTensor",
    "torch.storage.TypedStorage",
    "torch.storage.UntypedStorage",
    "torch.uint1",
    "torch.uint16",
    "torch.uint2",
    "torch.uint3",
    "torch.uint32",
    "torch.uint4",
    "torch.uint5",
    "torch.uint6",
    "torch.uint64",
    "torch.uint7",
    "torch.uint8",
];

/// Python 2 module names that pickle protocol 2 writes and Python 3 maps
/// (`_compat_pickle.IMPORT_MAPPING`, the entries that matter here).
fn python3_module(module: &str) -> &str {
    match module {
        "__builtin__" => "builtins",
        "copy_reg" => "copyreg",
        other => other,
    }
}

/// Resolves a `GLOBAL module name` (or `STACK_GLOBAL`) to the value it stands for,
/// refusing anything outside the allowlist.
pub(crate) fn resolve_global(module: &str, name: &str) -> Result<Value> {
    let module = python3_module(module);
    let top = module.split('.').next().unwrap_or(module);
    if BLOCKED_MODULES.contains(&top) {
        return Err(Error::Forbidden(format!(
            "global {module}.{name}: module {top} is blocked (nothing was executed)"
        )));
    }
    let full = format!("{module}.{name}");
    if ALLOWED.binary_search(&full.as_str()).is_err() {
        return Err(Error::Forbidden(format!(
            "global {full} is not on the weights-only allowlist (nothing was executed)"
        )));
    }
    if module == "torch"
        && let Some(d) = DType::from_torch_name(name)
        && d.torch_name() == name
    {
        return Ok(Value::DType(d));
    }
    Ok(Value::Global {
        module: module.to_string(),
        name: name.to_string(),
    })
}

/// The element type of a legacy typed storage class (`torch.FloatStorage`,
/// `torch.cuda.HalfStorage`); `Ok(None)` for `torch.storage.UntypedStorage`.
pub(crate) fn storage_dtype(module: &str, name: &str) -> Result<Option<DType>> {
    if module == "torch.storage" && name == "UntypedStorage" {
        return Ok(None);
    }
    if module != "torch" && module != "torch.cuda" {
        return Err(Error::Pickle(format!(
            "{module}.{name} is not a storage type"
        )));
    }
    let d = match name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        "ComplexFloatStorage" => DType::C64,
        "ComplexDoubleStorage" => {
            return Err(Error::Unsupported(format!(
                "{module}.{name}: complex128 tensors"
            )));
        }
        n if n.starts_with('Q') && n.ends_with("Storage") => {
            return Err(Error::Unsupported(format!(
                "{module}.{name}: quantized tensors"
            )));
        }
        _ => {
            return Err(Error::Pickle(format!(
                "{module}.{name} is not a storage type"
            )));
        }
    };
    Ok(Some(d))
}

/// The legacy storage class torch pickles for a tensor of `dtype` (`FloatStorage`),
/// or `None` for the dtypes torch writes as `UntypedStorage` with
/// `_rebuild_tensor_v3` (float8, uint16/32/64).
pub(crate) fn legacy_storage_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
        DType::C64 => "ComplexFloatStorage",
        DType::F8E5M2
        | DType::F8E4M3
        | DType::F8E8M0
        | DType::F8E4M3Fnuz
        | DType::F8E5M2Fnuz
        | DType::U16
        | DType::U32
        | DType::U64 => return None,
    })
}

/// Whether the writer may emit `GLOBAL module name` (it must load with
/// `torch.load(weights_only=True)`).
pub(crate) fn is_allowed(module: &str, name: &str) -> bool {
    let full = format!("{}.{name}", python3_module(module));
    ALLOWED.binary_search(&full.as_str()).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn list_is_sorted_for_binary_search() {
        assert!(ALLOWED.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn resolves_and_refuses() {
        assert_eq!(
            resolve_global("torch", "float32").ok(),
            Some(Value::DType(DType::F32))
        );
        assert_eq!(
            resolve_global("__builtin__", "set").ok(),
            Some(Value::Global {
                module: "builtins".into(),
                name: "set".into()
            })
        );
        for (m, n) in [
            ("os", "system"),
            ("posix", "system"),
            ("nt", "system"),
            ("sys", "exit"),
            ("builtins", "eval"),
            ("__builtin__", "eval"),
            ("subprocess", "Popen"),
            ("torch", "load"),
            ("os.path", "join"),
        ] {
            let e = resolve_global(m, n).unwrap_err();
            assert!(matches!(e, Error::Forbidden(_)), "{m}.{n}: {e}");
        }
        // Every dtype kiln has resolves to itself.
        for d in DType::ALL {
            assert_eq!(
                resolve_global("torch", d.torch_name()).ok(),
                Some(Value::DType(d))
            );
        }
    }
}
