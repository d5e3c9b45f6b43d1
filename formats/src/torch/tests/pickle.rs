//! The pickle reader on hand-written streams: opcodes of every protocol, the
//! allowlist, and hostile input.

use super::cat;
use crate::torch::pickle::{Limits, StorageRef, TensorRef, Value, dump, load, load_with_limits};
use crate::{DType, Error};

fn s(x: &str) -> Value {
    Value::String(x.into())
}

/// BINUNICODE of `x`.
fn bu(x: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(x.len() as u32).to_le_bytes());
    v.extend_from_slice(x.as_bytes());
    v
}

/// SHORT_BINUNICODE of `x` then MEMOIZE.
fn sbu(x: &str) -> Vec<u8> {
    let mut v = vec![0x8c, x.len() as u8];
    v.extend_from_slice(x.as_bytes());
    v.push(0x94);
    v
}

/// The stream torch 2.15 writes for `{'w': float32 2x3}` from a module (with the
/// `_metadata` BUILD), as in reference A1.
fn torch_state_dict_stream() -> Vec<u8> {
    cat(&[
        b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(",
        &bu("w"),
        b"q\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((",
        &bu("storage"),
        b"q\x04ctorch\nFloatStorage\nq\x05",
        &bu("0"),
        b"q\x06",
        &bu("cpu"),
        b"q\x07K\x06tq\x08QK\x00K\x02K\x03\x86q\tK\x03K\x01\x86q\n\x89h\x00)Rq\x0btq\x0cRq\ru}q\x0e",
        &bu("_metadata"),
        b"q\x0fh\x00)Rq\x10(",
        &bu(""),
        b"}q\x11",
        &bu("version"),
        b"K\x01susb.",
    ])
}

#[test]
fn protocol2_state_dict() {
    let v = load(&torch_state_dict_stream()).unwrap();
    let Value::OrderedDict(items) = &v else {
        panic!("{v:?}")
    };
    assert_eq!(items.len(), 1, "the _metadata BUILD adds no item");
    assert_eq!(items[0].0, s("w"));
    let t = items[0].1.as_tensor().unwrap();
    assert_eq!(
        *t,
        TensorRef {
            storage: StorageRef {
                key: "0".into(),
                dtype: Some(DType::F32),
                nbytes: 24,
                location: "cpu".into()
            },
            dtype: DType::F32,
            offset: 0,
            shape: vec![2, 3],
            stride: vec![3, 1],
            requires_grad: false,
        }
    );
}

#[test]
fn protocol4_frame_memoize_stack_global() {
    let body = cat(&[
        &sbu("collections"),
        &sbu("OrderedDict"),
        b"\x93\x94)R\x94(",
        &sbu("a"),
        b"K\x01",
        &sbu("b"),
        b"]\x94(K\x02G\x3f\xf8\x00\x00\x00\x00\x00\x00e",
        &sbu("c"),
        b"h\x04", // BINGET 4: the string "a"
        b"u.",
    ]);
    let stream = cat(&[b"\x80\x04\x95", &(body.len() as u64).to_le_bytes(), &body]);
    let v = load(&stream).unwrap();
    assert_eq!(
        v,
        Value::OrderedDict(vec![
            (s("a"), Value::Int(1)),
            (s("b"), Value::List(vec![Value::Int(2), Value::Float(1.5)])),
            (s("c"), s("a")),
        ])
    );
    // A frame longer than the stream is refused.
    let mut bad = stream.clone();
    bad[3] = 0xff;
    assert!(load(&bad).is_err());
}

#[test]
fn protocol_3_to_5_opcodes() {
    let stream = cat(&[
        b"\x80\x05(",
        // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
        b"B\x02\x00\x00\x00ab",
        b"C\x01c",
        b"\x8e\x01\x00\x00\x00\x00\x00\x00\x00d",
        b"\x96\x01\x00\x00\x00\x00\x00\x00\x00e",
        // BINUNICODE8
        b"\x8d\x02\x00\x00\x00\x00\x00\x00\x00hi",
        // EMPTY_SET + ADDITEMS, FROZENSET
        b"\x8f(K\x01K\x02\x90",
        b"(K\x03\x91",
        // LONG4: 2^40
        b"\x8b\x06\x00\x00\x00\x00\x00\x00\x00\x00\x01",
        // NEWOBJ_EX: OrderedDict.__new__(OrderedDict) with empty args and kwargs
        b"ccollections\nOrderedDict\n)}\x92",
        // DICT and LIST from a mark
        b"(K\x01K\x02d",
        b"(K\x03K\x04l",
        b"t.",
    ]);
    let v = load(&stream).unwrap();
    assert_eq!(
        v,
        Value::Tuple(vec![
            Value::Bytes(b"ab".to_vec()),
            Value::Bytes(b"c".to_vec()),
            Value::Bytes(b"d".to_vec()),
            Value::Bytes(b"e".to_vec()),
            s("hi"),
            Value::Set(vec![Value::Int(1), Value::Int(2)]),
            Value::Set(vec![Value::Int(3)]),
            Value::Int(1 << 40),
            Value::OrderedDict(vec![]),
            Value::Dict(vec![(Value::Int(1), Value::Int(2))]),
            Value::List(vec![Value::Int(3), Value::Int(4)]),
        ])
    );
}

#[test]
fn text_protocol_opcodes() {
    let stream = b"(I42\nI01\nI00\nL-7L\nF2.5\nS'it\\'s'\nVcaf\\u00e9\np0\n0g0\nN2t.";
    let v = load(stream).unwrap();
    assert_eq!(
        v,
        Value::Tuple(vec![
            Value::Int(42),
            Value::Bool(true),
            Value::Bool(false),
            Value::Int(-7),
            Value::Float(2.5),
            s("it's"),
            s("café"),
            Value::None,
            Value::None,
        ])
    );
}

#[test]
fn stack_and_integer_opcodes() {
    let stream = cat(&[
        b"\x80\x02(",
        b"K\xffM\xff\xffJ\xff\xff\xff\xff",
        // LONG1: 2^63-1, -2^63, 0 (empty), -1
        b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
        b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80",
        b"\x8a\x00",
        b"\x8a\x01\xff",
        // LONG1 with redundant sign extension still fits
        b"\x8a\x09\x01\x00\x00\x00\x00\x00\x00\x00\x00",
        // POP, POP_MARK, DUP
        b"N0",
        b"(K\x091",
        b"\x88\x85\x85",   // ((True,),)
        b"K\x01K\x02\x86", // (1, 2)
        b"K\x01K\x02K\x03\x87",
        b"\x892",
        b"t.",
    ]);
    let v = load(&stream).unwrap();
    let t = |v: Vec<Value>| Value::Tuple(v);
    assert_eq!(
        v,
        t(vec![
            Value::Int(255),
            Value::Int(65535),
            Value::Int(-1),
            Value::Int(i64::MAX),
            Value::Int(i64::MIN),
            Value::Int(0),
            Value::Int(-1),
            Value::Int(1),
            t(vec![t(vec![Value::Bool(true)])]),
            t(vec![Value::Int(1), Value::Int(2)]),
            t(vec![Value::Int(1), Value::Int(2), Value::Int(3)]),
            Value::Bool(false),
            Value::Bool(false),
        ])
    );
    // 2^64 does not fit.
    let e = load(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.").unwrap_err();
    assert!(e.to_string().contains("64 bits"), "{e}");
}

#[test]
fn allowlisted_globals() {
    let stream = cat(&[
        b"\x80\x02(",
        // bytes as protocol 2 writes them: _codecs.encode('\xff\x00', 'latin1')
        b"c_codecs\nencode\n",
        &bu("\u{ff}\u{0}"),
        &bu("latin1"),
        b"\x86R",
        // set([1]) under its Python 2 name
        b"c__builtin__\nset\n]K\x01a\x85R",
        b"cbuiltins\nbytearray\n",
        &bu("ab"),
        &bu("latin-1"),
        b"\x86R",
        b"cbuiltins\ncomplex\nG\x3f\xf0\x00\x00\x00\x00\x00\x00G\xc0\x00\x00\x00\x00\x00\x00\x00\x86R",
        b"ccollections\nCounter\n}",
        &bu("x"),
        b"K\x02s\x85R",
        b"ctorch\nSize\nK\x02K\x03\x86\x85R",
        b"ctorch\ndevice\n",
        &bu("cuda"),
        b"K\x01\x86R",
        b"ctorch\nbfloat16\n",
        b"ctorch\ncomplex128\n",
        b"t.",
    ]);
    let v = load(&stream).unwrap();
    assert_eq!(
        v,
        Value::Tuple(vec![
            Value::Bytes(vec![0xff, 0]),
            Value::Set(vec![Value::Int(1)]),
            Value::Bytes(b"ab".to_vec()),
            Value::Complex(1.0, -2.0),
            Value::Dict(vec![(s("x"), Value::Int(2))]),
            Value::Tuple(vec![Value::Int(2), Value::Int(3)]),
            Value::Device("cuda:1".into()),
            Value::DType(DType::BF16),
            Value::Global {
                module: "torch".into(),
                name: "complex128".into()
            },
        ])
    );
}

#[test]
fn duplicate_keys_keep_last_value() {
    let stream = cat(&[b"\x80\x02}(", &bu("a"), b"K\x01", &bu("a"), b"K\x02u."]);
    assert_eq!(
        load(&stream).unwrap(),
        Value::Dict(vec![(s("a"), Value::Int(2))])
    );
}

#[test]
fn memoized_container_is_shared() {
    // d = {}; x = [d, d]; d['k'] = 1 is visible through both.
    let stream = cat(&[b"\x80\x02](}q\x00h\x00e", b"h\x00", &bu("k"), b"K\x01s0."]);
    let v = load(&stream).unwrap();
    let d = Value::Dict(vec![(s("k"), Value::Int(1))]);
    assert_eq!(v, Value::List(vec![d.clone(), d]));
}

fn forbidden(stream: &[u8]) -> String {
    match load(stream) {
        Err(Error::Forbidden(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn refuses_globals_outside_the_allowlist() {
    for (module, name) in [
        ("os", "system"),
        ("posix", "system"),
        ("nt", "system"),
        ("sys", "modules"),
        ("builtins", "eval"),
        ("__builtin__", "exec"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("collections", "defaultdict"),
    ] {
        // GLOBAL
        let stream = cat(&[
            b"\x80\x02c",
            module.as_bytes(),
            b"\n",
            name.as_bytes(),
            b"\n",
            &bu("echo pwned"),
            b"\x85R.",
        ]);
        let m = forbidden(&stream);
        assert!(m.contains(&format!(".{name}")), "{m}");
        // STACK_GLOBAL
        let stream = cat(&[
            b"\x80\x04",
            &sbu(module),
            &sbu(name),
            b"\x93",
            &bu("echo pwned"),
            b"\x85R.",
        ]);
        let m = forbidden(&stream);
        assert!(m.contains(name), "{m}");
    }
}

#[test]
fn refuses_calls_and_builds_on_non_rebuild_objects() {
    // REDUCE on an allowlisted class that is not a rebuild function.
    forbidden(b"\x80\x02ctorch\nFloatStorage\n)R.");
    forbidden(b"\x80\x02ctorch\nfloat32\n)R.");
    // REDUCE on something that is not a global at all.
    forbidden(&cat(&[b"\x80\x02", &bu("os.system"), b")R."]));
    // BUILD on a list, a dict, a string.
    forbidden(b"\x80\x02]}b.");
    forbidden(b"\x80\x02}}b.");
    forbidden(&cat(&[b"\x80\x02", &bu("x"), b"}b."]));
    // NEWOBJ on a class that is not allowed to be instantiated.
    forbidden(b"\x80\x02ctorch\nTensor\n)\x81.");
    // INST and OBJ go through the same checks.
    forbidden(b"\x80\x02(ctorch\nFloatStorage\no.");
    forbidden(b"(ios\nsystem\n.");
    // Extension registry and non-storage persistent ids.
    forbidden(b"\x80\x02\x82\x01.");
    forbidden(&cat(&[b"\x80\x02(", &bu("module"), b"tQ."]));
    // _rebuild_from_type_v2 may only wrap a tensor rebuild function.
    forbidden(
        b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\nctorch\nTensor\n)NtR.",
    );
}

#[test]
fn unsupported_torch_objects_say_so() {
    for stream in [
        &b"\x80\x02ctorch._utils\n_rebuild_qtensor\n)R."[..],
        b"\x80\x02ctorch._utils\n_rebuild_sparse_tensor\n)R.",
        b"\x80\x02\x97.",
        b"\x80\x02P0\n.",
    ] {
        let e = load(stream).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
    }
}

fn pickle_error(stream: &[u8]) -> String {
    match load(stream) {
        Err(Error::Pickle(m)) => m,
        other => panic!("expected a pickle error, got {other:?}"),
    }
}

#[test]
fn malformed_streams() {
    assert!(pickle_error(b"\x80\x02h\x05.").contains("memo index 5"));
    assert!(pickle_error(b"\x80\x02j\x00\x00\x00\x01.").contains("memo index"));
    assert!(pickle_error(b"\x80\x02R.").contains("underflow"));
    assert!(pickle_error(b"\x80\x02(\x85.").contains("underflow"));
    assert!(pickle_error(b"\x80\x02e.").contains("MARK"));
    assert!(pickle_error(b"\x80\x02\xff.").contains("unknown opcode 0xff"));
    assert!(pickle_error(b"\x80\x06N.").contains("protocol"));
    assert!(pickle_error(b"\x80\x02K\x01").contains("STOP"));
    assert!(pickle_error(b"").contains("STOP"));
    assert!(pickle_error(b"\x80\x02.").contains("underflow"));
    assert!(pickle_error(b"\x80\x02(K\x01K\x02K\x03d.").contains("odd"));
    assert!(pickle_error(b"\x80\x02K\x01K\x02a.").contains("not a list"));
    // Lengths beyond the stream are refused before allocating.
    assert!(pickle_error(b"\x80\x02X\xff\xff\xff\xffab.").contains("truncated"));
    assert!(pickle_error(b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xffab.").contains("truncated"));
    assert!(pickle_error(b"\x80\x02\x8b\xff\xff\xff\x7f\x00.").contains("truncated"));
    assert!(pickle_error(b"\x80\x03B\xff\xff\xff\x7f.").contains("truncated"));
    assert!(pickle_error(b"\x80\x02X\x02\x00\x00\x00\xff\xfe.").contains("UTF-8"));
    assert!(pickle_error(b"\x80\x02\x8b\xff\xff\xff\xff.").contains("negative"));
}

#[test]
fn every_truncation_of_a_real_stream_is_an_error() {
    let stream = torch_state_dict_stream();
    for n in 0..stream.len() {
        assert!(load(&stream[..n]).is_err(), "prefix of {n} bytes");
    }
}

#[test]
fn deep_nesting_is_bounded() {
    // 900 nested lists read; 2000 do not.
    let nested = |depth: usize| {
        let mut s = b"\x80\x02".to_vec();
        s.extend(std::iter::repeat_n(b']', depth));
        s.extend(std::iter::repeat_n(b'a', depth - 1));
        s.push(b'.');
        s
    };
    let mut v = load(&nested(900)).unwrap();
    let mut depth = 1;
    while let Value::List(mut items) = v {
        match items.pop() {
            Some(inner) => {
                v = inner;
                depth += 1;
            }
            None => break,
        }
    }
    assert_eq!(depth, 900);
    assert!(pickle_error(&nested(2000)).contains("deeper"));
    // A list that contains itself.
    assert!(pickle_error(b"\x80\x02]q\x00h\x00a.").contains("recursive"));
}

#[test]
fn shared_references_cannot_explode() {
    // l0 = []; l1 = [l0, l0]; l2 = [l1, l1]; ... : 2^60 objects once copied.
    let mut s = b"\x80\x02]q\x00".to_vec();
    for i in 1..=60u8 {
        s.extend_from_slice(&[b']', b'(', b'h', i - 1, b'h', i - 1, b'e', b'q', i]);
    }
    s.push(b'.');
    assert!(pickle_error(&s).contains("objects"));
}

#[test]
fn object_limit() {
    let limits = Limits {
        max_objects: 10,
        ..Limits::default()
    };
    let mut s = b"\x80\x02(".to_vec();
    s.extend(std::iter::repeat_n(b'N', 20));
    s.extend_from_slice(b"t.");
    let e = load_with_limits(&s, limits).unwrap_err();
    assert!(e.to_string().contains("objects"), "{e}");
}

#[test]
fn persistent_ids_and_tensor_rebuilds() {
    // _rebuild_tensor_v3 on an UntypedStorage of 8 bytes, viewed as float8 2x4,
    // wrapped in _rebuild_parameter.
    let stream = cat(&[
        b"\x80\x02ctorch._utils\n_rebuild_parameter\n(ctorch._utils\n_rebuild_tensor_v3\n((",
        &bu("storage"),
        b"ctorch.storage\nUntypedStorage\n",
        &bu("7"),
        &bu("cuda:0"),
        b"K\x08tQK\x00K\x02K\x04\x86K\x04K\x01\x86\x89ccollections\nOrderedDict\n)R",
        b"ctorch\nfloat8_e4m3fn\ntR\x88}tR.",
    ]);
    let v = load(&stream).unwrap();
    let t = v.as_tensor().unwrap();
    assert_eq!(t.dtype, DType::F8E4M3);
    assert_eq!(t.storage.dtype, None);
    assert_eq!(t.storage.nbytes, 8);
    assert_eq!(t.storage.key, "7");
    assert_eq!(t.storage.location, "cuda:0");
    assert!(t.requires_grad);
    // A negative stride is refused.
    let stream = cat(&[
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((",
        &bu("storage"),
        b"ctorch\nFloatStorage\n",
        &bu("0"),
        &bu("cpu"),
        b"K\x04tQK\x00K\x04\x85J\xff\xff\xff\xff\x85\x89}tR.",
    ]);
    let e = load(&stream).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    // complex128 storages are refused with a reason.
    let stream = cat(&[
        b"\x80\x02(",
        &bu("storage"),
        b"ctorch\nComplexDoubleStorage\n",
        &bu("0"),
        &bu("cpu"),
        b"K\x04tQ.",
    ]);
    assert!(
        load(&stream)
            .unwrap_err()
            .to_string()
            .contains("complex128")
    );
}

#[test]
fn writer_emits_protocol_2_only_and_minimal_ints() {
    let tree = Value::Dict(vec![
        (Value::Int(0), Value::Int(255)),
        (Value::Int(1), Value::Int(256)),
        (Value::Int(2), Value::Int(65536)),
        (Value::Int(3), Value::Int(-1)),
        (Value::Int(4), Value::Int(1 << 31)),
        (Value::Int(5), Value::Int(i64::MIN)),
        (s("f"), Value::Float(0.001)),
        (s("b"), Value::Bytes(vec![0, 255])),
        (s("t"), Value::Tuple(vec![Value::None; 5])),
        (s("set"), Value::Set(vec![Value::Bool(true)])),
        (s("c"), Value::Complex(1.0, 2.0)),
        (s("dev"), Value::Device("cpu".into())),
        (s("dt"), Value::DType(DType::F8E5M2)),
        (
            s("od"),
            Value::OrderedDict(vec![(s("x"), Value::List(vec![]))]),
        ),
    ]);
    let bytes = dump(&tree).unwrap();
    assert_eq!(load(&bytes).unwrap(), tree);
    // Minimal encodings.
    let ints = |i: i64| dump(&Value::Int(i)).unwrap()[2..].to_vec();
    assert_eq!(ints(255), b"K\xff.");
    assert_eq!(ints(256), b"M\x00\x01.");
    assert_eq!(ints(65536), b"J\x00\x00\x01\x00.");
    assert_eq!(ints(-1), b"J\xff\xff\xff\xff.");
    assert_eq!(ints(1 << 31), b"\x8a\x05\x00\x00\x00\x80\x00.");
    assert_eq!(ints(-(1 << 31) - 1), b"\x8a\x05\xff\xff\xff\x7f\xff.");
    assert_eq!(ints(1 << 33), b"\x8a\x05\x00\x00\x00\x00\x02.");
    // Globals off torch's allowlist are not written.
    let e = dump(&Value::Global {
        module: "os".into(),
        name: "system".into(),
    })
    .unwrap_err();
    assert!(matches!(e, Error::Forbidden(_)), "{e}");
}

#[test]
fn deepest_allowed_tree_round_trips_without_overflow() {
    let nest = |depth: usize| {
        let mut v = Value::Dict(vec![(Value::Int(0), Value::None)]);
        for i in 1..depth {
            v = if i % 2 == 0 {
                Value::List(vec![v])
            } else {
                Value::Dict(vec![(Value::Int(i as i64), v)])
            };
        }
        v
    };
    let v = nest(1000);
    let bytes = dump(&v).unwrap();
    let back = load(&bytes).unwrap();
    assert!(back == v);
    drop(back);
    assert!(dump(&nest(1002)).is_err());
}
