//! Hostile and unusual zip containers.

use super::{cat, write, zip_bytes};
use crate::torch::archive::{Archive, ZipWriter};
use crate::torch::pickle::{TensorRef, Value, dump};
use crate::torch::{StorageMap, TorchFile, save_value};
use crate::{DType, Error, TensorCollection};

/// `data.pkl` for `{'w': float32[2]}` on storage "0".
fn pkl() -> Vec<u8> {
    dump(&Value::OrderedDict(vec![(
        Value::String("w".into()),
        Value::Tensor(Box::new(TensorRef::contiguous("0", DType::F32, vec![2]))),
    )]))
    .unwrap()
}

const W: [u8; 8] = [0, 0, 128, 63, 0, 0, 0, 64]; // [1.0, 2.0]

fn good_with_prefix(prefix: &str) -> Vec<u8> {
    let pkl = pkl();
    zip_bytes(&[
        (&format!("{prefix}/data.pkl"), &pkl),
        (&format!("{prefix}/byteorder"), b"little"),
        (&format!("{prefix}/data/0"), &W),
        (&format!("{prefix}/version"), b"3\n"),
    ])
}

fn good() -> Vec<u8> {
    good_with_prefix("archive")
}

/// The offset of the central directory header of `name`.
fn central(zip: &[u8], name: &str) -> usize {
    (0..zip.len() - 46)
        .find(|&i| {
            zip[i..i + 4] == *b"PK\x01\x02" && {
                let n = u16::from_le_bytes([zip[i + 28], zip[i + 29]]) as usize;
                zip.get(i + 46..i + 46 + n) == Some(name.as_bytes())
            }
        })
        .unwrap()
}

fn local(zip: &[u8], name: &str) -> usize {
    let c = central(zip, name);
    u32::from_le_bytes(zip[c + 42..c + 46].try_into().unwrap()) as usize
}

/// Renames `from` to `to` (of the same length) in the local and central headers.
fn rename(zip: &mut [u8], from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    for at in [local(zip, from) + 30, central(zip, from) + 46] {
        assert_eq!(&zip[at..at + from.len()], from.as_bytes());
        zip[at..at + to.len()].copy_from_slice(to.as_bytes());
    }
}

fn set_u16(zip: &mut [u8], at: usize, v: u16) {
    zip[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn set_u32(zip: &mut [u8], at: usize, v: u32) {
    zip[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn open(bytes: &[u8]) -> crate::Result<TorchFile> {
    let dir = tempfile::tempdir().unwrap();
    TorchFile::open(write(dir.path(), "m.bin", bytes))
}

/// The error inside the `File` wrapper that names the path.
fn inner(e: Error) -> Error {
    match e {
        Error::File { source, .. } => *source,
        e => e,
    }
}

fn open_err(bytes: &[u8]) -> Error {
    inner(open(bytes).unwrap_err())
}

#[test]
fn baseline_and_prefixes() {
    for prefix in ["archive", "pytorch_model", "a.b"] {
        let f = open(&good_with_prefix(prefix)).unwrap();
        assert_eq!(f.prefix(), format!("{prefix}/"));
        assert_eq!(f.tensors().len(), 1);
        assert_eq!(f.tensor("w").unwrap().data(), &W);
        assert!(f.tensor("w").unwrap().is_borrowed());
        f.verify().unwrap();
    }
}

#[test]
fn payloads_are_aligned_and_zip64_is_read() {
    let bytes = good();
    let archive = Archive::parse(&bytes).unwrap();
    for e in archive.entries() {
        assert_eq!(e.data_start % 64, 0, "{}", e.name);
    }
    let pkl = pkl();
    let mut w = ZipWriter::new(std::io::Cursor::new(Vec::new())).with_zip64();
    for (name, data) in [
        ("archive/data.pkl", &pkl[..]),
        ("archive/data/0", &W[..]),
        ("archive/version", b"3\n"),
    ] {
        w.add(name, data).unwrap();
    }
    let bytes = w.finish().unwrap().into_inner();
    let f = open(&bytes).unwrap();
    assert_eq!(f.tensor("w").unwrap().data(), &W);
    f.verify().unwrap();
}

#[test]
fn refuses_escaping_names() {
    for bad in ["archive/../x", "/archive/x", "archive/..", "archive\\x"] {
        let pkl = pkl();
        let bytes = zip_bytes(&[
            ("archive/data.pkl", &pkl),
            ("archive/data/0", &W),
            (bad, b"x"),
        ]);
        let e = open_err(&bytes);
        assert!(matches!(e, Error::Zip(_)), "{bad}: {e}");
    }
}

#[test]
fn refuses_compressed_entries() {
    let mut bytes = good();
    let (c, l) = (
        central(&bytes, "archive/data/0"),
        local(&bytes, "archive/data/0"),
    );
    set_u16(&mut bytes, c + 10, 8);
    set_u16(&mut bytes, l + 8, 8);
    let e = open_err(&bytes);
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("compressed")),
        "{e}"
    );
    // Headers that disagree.
    let mut bytes = good();
    let l = local(&bytes, "archive/data/0");
    set_u16(&mut bytes, l + 8, 8);
    let e = open_err(&bytes);
    assert!(matches!(&e, Error::Zip(m) if m.contains("disagree")), "{e}");
}

#[test]
fn refuses_overlapping_entries() {
    let mut bytes = good();
    let c = central(&bytes, "archive/data.pkl");
    let size = u32::from_le_bytes(bytes[c + 24..c + 28].try_into().unwrap());
    set_u32(&mut bytes, c + 20, size + 100);
    set_u32(&mut bytes, c + 24, size + 100);
    let e = open_err(&bytes);
    assert!(matches!(&e, Error::Zip(m) if m.contains("overlap")), "{e}");

    // Two central entries pointing at one local header.
    let mut bytes = good();
    let target = local(&bytes, "archive/data/0") as u32;
    let c = central(&bytes, "archive/byteorder");
    set_u32(&mut bytes, c + 42, target);
    let e = open_err(&bytes);
    assert!(matches!(&e, Error::Zip(_)), "{e}");
}

#[test]
fn refuses_entries_past_the_end() {
    let mut bytes = good();
    let c = central(&bytes, "archive/data/0");
    set_u32(&mut bytes, c + 20, 0x7fff_ffff);
    set_u32(&mut bytes, c + 24, 0x7fff_ffff);
    let e = open_err(&bytes);
    assert!(
        matches!(&e, Error::Zip(m) if m.contains("past the end")),
        "{e}"
    );

    let mut bytes = good();
    let c = central(&bytes, "archive/data/0");
    set_u32(&mut bytes, c + 42, 0x7fff_0000);
    let e = open_err(&bytes);
    assert!(matches!(&e, Error::Zip(_)), "{e}");
}

#[test]
fn refuses_torchscript_legacy_and_other_files() {
    let pkl = pkl();
    let bytes = zip_bytes(&[
        ("archive/data.pkl", &pkl),
        ("archive/constants.pkl", b"\x80\x02).".as_slice()),
        ("archive/data/0", &W),
    ]);
    let e = open_err(&bytes);
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("TorchScript")),
        "{e}"
    );
    // TorchScript deflates its code entries: still named as TorchScript.
    let mut bytes = zip_bytes(&[
        ("archive/data.pkl", &pkl),
        ("archive/code/m.py", b"x"),
        ("archive/constants.pkl", b"\x80\x02).".as_slice()),
    ]);
    let (c, l) = (
        central(&bytes, "archive/code/m.py"),
        local(&bytes, "archive/code/m.py"),
    );
    set_u16(&mut bytes, c + 10, 8);
    set_u16(&mut bytes, l + 8, 8);
    let e = open_err(&bytes);
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("TorchScript")),
        "{e}"
    );

    // A pre-1.6 file is a bare pickle: the detection message.
    let e = open_err(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.");
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("legacy")),
        "{e}"
    );
    let mut tar = vec![0u8; 1024];
    tar[257..262].copy_from_slice(b"ustar");
    let e = open_err(&tar);
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("legacy")),
        "{e}"
    );
    let e = open_err(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\":{}}");
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("safetensors")),
        "{e}"
    );
    assert!(open(b"").is_err());
    assert!(open(b"PK\x03\x04garbage").is_err());
}

#[test]
fn refuses_bad_layouts() {
    let pkl = pkl();
    // No data.pkl in a folder.
    let e = open_err(&zip_bytes(&[("data.pkl", &pkl), ("data/0", &W)]));
    assert!(matches!(&e, Error::Zip(m) if m.contains("folder")), "{e}");
    let e = open_err(&zip_bytes(&[("archive/x", &pkl)]));
    assert!(matches!(&e, Error::Zip(_)), "{e}");
    // Entries outside the folder, two data.pkl.
    let e = open_err(&zip_bytes(&[
        ("archive/data.pkl", &pkl),
        ("archive/data/0", &W),
        ("other/x", b""),
    ]));
    assert!(matches!(&e, Error::Zip(m) if m.contains("outside")), "{e}");
    let e = open_err(&zip_bytes(&[("a/data.pkl", &pkl), ("b/data.pkl", &pkl)]));
    assert!(matches!(&e, Error::Zip(_)), "{e}");
    // A storage record that is missing, or of the wrong size.
    let e = open_err(&zip_bytes(&[("archive/data.pkl", &pkl)]));
    assert!(matches!(&e, Error::Zip(m) if m.contains("data/0")), "{e}");
    let e = open_err(&zip_bytes(&[
        ("archive/data.pkl", &pkl),
        ("archive/data/0", &[0u8; 12]),
    ]));
    assert!(
        matches!(&e, Error::Tensor(m) if m.contains("record")),
        "{e}"
    );
    // Big-endian.
    let e = open_err(&zip_bytes(&[
        ("archive/data.pkl", &pkl),
        ("archive/byteorder", b"big"),
        ("archive/data/0", &W),
    ]));
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("big")),
        "{e}"
    );
    // Duplicate names (the writer refuses them: rename an entry in place).
    let mut bytes = zip_bytes(&[
        ("archive/data.pkl", &pkl),
        ("archive/data/0", &W),
        ("archive/data/1", &W),
    ]);
    rename(&mut bytes, "archive/data/1", "archive/data/0");
    let e = open_err(&bytes);
    assert!(
        matches!(&e, Error::Zip(m) if m.contains("same name")),
        "{e}"
    );
}

#[test]
fn forbidden_pickle_in_a_zip() {
    let evil = cat(&[b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R."]);
    let e = open(&zip_bytes(&[("archive/data.pkl", &evil)])).unwrap_err();
    assert!(e.to_string().contains("m.bin"), "{e}");
    let e = inner(e);
    assert!(
        matches!(&e, Error::Forbidden(m) if m.contains("posix.system")),
        "{e}"
    );
}

#[test]
fn verify_checks_crcs() {
    let mut bytes = good();
    let l = local(&bytes, "archive/data/0");
    let n = u16::from_le_bytes([bytes[l + 26], bytes[l + 27]]) as usize;
    let x = u16::from_le_bytes([bytes[l + 28], bytes[l + 29]]) as usize;
    bytes[l + 30 + n + x] ^= 1;
    let f = open(&bytes).unwrap();
    let e = inner(f.verify().unwrap_err());
    assert!(matches!(&e, Error::Zip(m) if m.contains("CRC")), "{e}");
}

#[test]
fn failed_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bin");
    std::fs::write(&out, b"old").unwrap();
    // The source lacks the storage: the write fails after data.pkl.
    let tree = Value::Tensor(Box::new(TensorRef::contiguous("k", DType::U8, vec![3])));
    let e = save_value(&out, &tree, &StorageMap::new()).unwrap_err();
    assert!(e.to_string().contains("storage k"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "temporary file left behind");
}

#[test]
fn refuses_local_headers_that_disagree() {
    let zip_msg = |bytes: &[u8]| match open_err(bytes) {
        Error::Zip(m) => m,
        e => panic!("{e}"),
    };
    // CRC, name and time in the local header against the central directory.
    let mut bytes = good();
    let l = local(&bytes, "archive/data/0");
    set_u32(&mut bytes, l + 14, 7);
    let m = zip_msg(&bytes);
    assert!(m.contains("disagree") && m.contains("CRC"), "{m}");
    let mut bytes = good();
    bytes[l + 30 + "archive/data/".len()] = b'1';
    let m = zip_msg(&bytes);
    assert!(m.contains("disagree") && m.contains("name"), "{m}");
    let mut bytes = good();
    set_u16(&mut bytes, l + 10, 0x1234);
    let m = zip_msg(&bytes);
    assert!(m.contains("disagree") && m.contains("time"), "{m}");
    // A local header that is not one, or that is cut short.
    let mut bytes = good();
    let c = central(&bytes, "archive/data/0");
    set_u32(&mut bytes, c + 42, (l + 1) as u32);
    assert!(zip_msg(&bytes).contains("archive/data/0"));
    let len = bytes.len() as u32;
    set_u32(&mut bytes, c + 42, len - 10);
    assert!(zip_msg(&bytes).contains("archive/data/0"));
    // Data that runs on into the central directory.
    let mut bytes = good();
    let (l, c) = (
        local(&bytes, "archive/version"),
        central(&bytes, "archive/version"),
    );
    for at in [l + 18, l + 22, c + 20, c + 24] {
        set_u32(&mut bytes, at, 3);
    }
    assert!(zip_msg(&bytes).contains("central directory"));
}
