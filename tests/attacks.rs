//! Hostile files (tests/attacks/, made by make_attacks.py) are refused with a one-line
//! error that says what is wrong, by the library and by `kiln inspect` / `kiln verify`,
//! and nothing in them is ever executed (the canary test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_mentions, attack, kiln};
use kiln::formats;

/// Where a defect shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// In the header, index, central directory or pickle: `open` refuses.
    Open,
    /// Possibly only when the bytes are read: `open` may succeed, `verify` refuses.
    Read,
}

/// Checks one hostile file: refused by the library, and by the CLI, with a one-line
/// message containing one of `keywords` (case-insensitive).
fn check_refused(rel: &str, stage: Stage, keywords: &[&str]) {
    let path = attack(rel);
    assert!(
        path.exists(),
        "{} is missing: run make_attacks.py",
        path.display()
    );

    // The library.
    let err = match formats::open(&path) {
        Err(e) => e,
        Ok(c) => {
            assert_eq!(
                stage,
                Stage::Read,
                "{rel}: opened, but the defect is visible without reading any tensor \
                 ({} tensors listed)",
                c.tensors().len()
            );
            // Reading tensors one by one must not panic, whatever it returns.
            for info in c.tensors() {
                let _ = c.tensor(&info.name);
            }
            match c.verify() {
                Err(e) => e,
                Ok(()) => panic!("{rel}: open and verify both accepted a hostile file"),
            }
        }
    };
    let msg = err.to_string();
    assert!(
        !msg.trim().is_empty() && !msg.contains('\n'),
        "{rel}: the error must be one line: {msg:?}"
    );
    assert_mentions(&without_path(&msg, &path), keywords, rel);

    // The CLI: verify always refuses; inspect refuses what open refuses.
    let file_name = Path::new(rel)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let verify = kiln(["verify".as_ref(), path.as_os_str()]);
    let line = cli_error(&verify, &path, keywords);
    if path.is_file() {
        assert!(
            line.contains(&file_name),
            "kiln verify {rel}: the message should name the file: {line}"
        );
    }
    let inspect = kiln(["inspect".as_ref(), "--json".as_ref(), path.as_os_str()]);
    match stage {
        Stage::Open => {
            cli_error(&inspect, &path, keywords);
        }
        Stage::Read => {
            inspect.expect_no_panic();
            if inspect.code != Some(0) {
                cli_error(&inspect, &path, keywords);
            }
        }
    }
}

/// The message with the hostile file's path and name taken out, so that a key word in
/// the file's name (`pickle_os_system.pt`) does not count as the message saying it.
fn without_path(msg: &str, path: &Path) -> String {
    let mut m = msg.replace(&path.display().to_string(), "<path>");
    if let Some(name) = path.file_name() {
        m = m.replace(&*name.to_string_lossy(), "<name>");
    }
    m
}

/// Exit 1, one line on stderr, a key word outside the path; returns the line.
fn cli_error<'a>(run: &'a common::Run, path: &Path, keywords: &[&str]) -> &'a str {
    run.expect_code(1);
    let line = run.one_stderr_line();
    assert_mentions(
        &without_path(line, path),
        keywords,
        &format!("kiln {:?}", run.args),
    );
    line
}

macro_rules! attacks {
    ($($test:ident: $rel:literal, $stage:ident, [$($kw:literal),+ $(,)?];)*) => {
        $(
            #[test]
            fn $test() {
                check_refused($rel, Stage::$stage, &[$($kw),+]);
            }
        )*
        /// Every case above.
        const CASES: &[&str] = &[$($rel),*];
    };
}

attacks! {
    // Pickles that would run code. Refused at the GLOBAL, before any call.
    pickle_os_system: "pickle_os_system.pt", Open, ["system"];
    pickle_posix_system: "pickle_posix_system.pt", Open, ["posix"];
    pickle_builtins_eval: "pickle_builtins_eval.pt", Open, ["eval"];
    pickle_subprocess_popen: "pickle_subprocess_popen.pt", Open, ["popen"];
    pickle_protocol4_stack_global_os_system: "pickle4_stack_global_os_system.pt", Open, ["system"];
    pickle_reduce_on_non_allowlisted_callable: "pickle_reduce_getattr.pt", Open, ["getattr"];
    pickle_reduce_on_a_string: "pickle_reduce_on_string.pt", Open, ["reduce", "call"];
    pickle_build_on_arbitrary_object: "pickle_build_on_int.pt", Open, ["build"];
    // Pickles that would exhaust the stack or memory, or read out of bounds.
    pickle_100k_nested_lists: "pickle_deep_lists.pt", Open, ["deep", "depth", "nest"];
    pickle_100k_nested_tuples: "pickle_deep_tuples.pt", Open, ["deep", "depth", "nest"];
    pickle_memo_index_missing: "pickle_memo_get_missing.pt", Open, ["memo"];
    pickle_memo_index_out_of_range: "pickle_memo_long_get.pt", Open, ["memo"];
    pickle_string_longer_than_file: "pickle_huge_string.pt", Open,
        ["truncat", "end of", "eof", "length", "past"];
    pickle_without_stop: "pickle_truncated.pt", Open, ["truncat", "end of", "eof", "stop"];
    pickle_unknown_opcode: "pickle_unknown_opcode.pt", Open, ["opcode"];
    // Tensors whose storage does not hold them.
    pickle_storage_record_missing: "pickle_storage_missing.pt", Read,
        ["data/7", "missing", "not found", "no record", "no storage"];
    pickle_view_past_its_storage: "pickle_view_out_of_bounds.pt", Read,
        ["bound", "range", "exceed", "outside", "out of", "past", "beyond", "reach"];
    pickle_stride_overflow: "pickle_stride_overflow.pt", Read,
        ["overflow", "bound", "range", "exceed", "outside", "out of", "past", "beyond", "reach"];
    pickle_numel_disagrees_with_record: "pickle_numel_mismatch.pt", Read,
        ["bytes", "size", "numel", "length", "mismatch"];
    // Zip containers.
    zip_entry_named_dotdot: "zip_entry_dotdot.pt", Open,
        ["../x", "outside", "escape", "unsafe", "traversal"];
    zip_entry_named_absolute: "zip_entry_absolute.pt", Open,
        ["/etc/x", "absolute", "outside", "unsafe"];
    zip_overlapping_entries: "zip_overlapping_entries.pt", Read, ["overlap"];
    zip_central_directory_lies_about_size: "zip_cd_size_mismatch.pt", Read,
        ["size", "mismatch", "central", "local", "disagree", "differ", "match", "overlap"];
    zip_size_past_end_of_file: "zip_cd_size_past_eof.pt", Read,
        ["end of", "past", "truncat", "eof", "beyond", "exceed", "outside"];
    zip_deflated_storage_record: "zip_deflated_storage.pt", Read,
        ["compress", "deflat", "stored", "method"];
    zip_bomb: "zip_bomb.pt", Read, ["compress", "deflat", "stored", "method"];
    zip_without_data_pkl: "zip_no_data_pkl.pt", Open, ["data.pkl"];
    // safetensors headers.
    safetensors_header_length_past_eof: "st_header_len_past_eof.safetensors", Open,
        ["header"];
    safetensors_header_over_100mb: "st_header_too_large.safetensors", Open,
        ["large", "limit", "too big", "exceed", "maximum", "past", "beyond"];
    safetensors_overlapping_offsets: "st_overlapping_offsets.safetensors", Open, ["overlap"];
    safetensors_gapped_offsets: "st_gapped_offsets.safetensors", Open, ["gap"];
    safetensors_non_utf8_header: "st_non_utf8_header.safetensors", Open, ["utf"];
    safetensors_duplicate_names: "st_duplicate_names.safetensors", Open, ["duplicate"];
    safetensors_shape_overflows_u64: "st_shape_overflow.safetensors", Open, ["overflow"];
    safetensors_dtype_times_shape_is_not_byte_length: "st_byte_length_mismatch.safetensors",
        Open, ["bytes", "length", "size", "mismatch", "match"];
    safetensors_offsets_past_eof: "st_offsets_past_eof.safetensors", Open,
        ["end of", "past", "truncat", "beyond", "exceed", "short", "length", "size"];
    safetensors_unknown_dtype: "st_unknown_dtype.safetensors", Open, ["F33", "dtype"];
    safetensors_header_not_json: "st_header_not_json.safetensors", Open, ["json", "header"];
    safetensors_metadata_not_strings: "st_metadata_not_strings.safetensors", Open,
        ["metadata", "__metadata__", "string"];
    // Truncated and empty files.
    truncated_zip: "truncated_zip.pt", Open,
        ["central directory", "end of central", "truncat", "zip"];
    truncated_safetensors: "truncated.safetensors", Open,
        ["truncat", "end of", "past", "beyond", "exceed", "short", "length", "size"];
    empty_file: "empty_file.bin", Open, ["empty"];
    // Shard indexes.
    index_weight_map_leaves_the_folder: "index_traversal/model", Open,
        ["..", "folder", "outside", "escape"];
    index_weight_map_absolute_path: "index_absolute", Open,
        ["/etc/passwd", "folder", "absolute", "outside"];
    index_names_a_missing_shard: "index_missing_shard", Open,
        ["model-00001-of-00002.safetensors"];
    index_puts_a_tensor_in_the_wrong_shard: "index_wrong_shard", Open,
        ["\"b\"", "not in", "weight_map"];
    // Formats kiln does not read, said so.
    legacy_raw_pickle: "legacy_raw_pickle.pt", Open, ["legacy"];
    legacy_tar: "legacy_tar.pt", Open, ["tar"];
    torchscript_archive: "torchscript.pt", Open, ["torchscript", "jit", "constants.pkl"];
    unsupported_dtype_complex128: "unsupported_complex128.pt", Open,
        ["complex128", "complexdouble", "cdouble"];
}

/// Every file and folder in tests/attacks/ has a case above.
#[test]
fn every_attack_file_has_a_case() {
    let tested: BTreeSet<String> = CASES
        .iter()
        .map(|c| c.split('/').next().unwrap_or(c).to_string())
        .collect();
    let mut present = BTreeSet::new();
    for entry in std::fs::read_dir(attack("")).expect("tests/attacks") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name != "make_attacks.py" && name != "__pycache__" {
            present.insert(name);
        }
    }
    assert_eq!(
        present, tested,
        "attack files without a case, or cases without a file"
    );
}

// ------------------------------------------------------------------------ the canary

/// A minimal zip writer: stored entries, CRC and sizes in the local headers.
fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32fast::hash(data);
        let header = |sig: u32, central: bool| {
            let mut h = Vec::new();
            h.extend(sig.to_le_bytes());
            if central {
                h.extend(20u16.to_le_bytes()); // version made by
            }
            h.extend(20u16.to_le_bytes()); // version needed
            h.extend(0x0800u16.to_le_bytes()); // UTF-8 names
            h.extend(0u16.to_le_bytes()); // stored
            h.extend(0u32.to_le_bytes()); // time, date
            h.extend(crc.to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // extra
            if central {
                h.extend([0u8; 6]); // comment len, disk, internal attrs
                h.extend(0u32.to_le_bytes()); // external attrs
                h.extend(offset.to_le_bytes());
            }
            h.extend(name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend(header(0x0201_4b50, true));
    }
    let cd_offset = out.len() as u32;
    let n = entries.len() as u16;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend(n.to_le_bytes());
    out.extend(n.to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend([0u8; 2]);
    out
}

fn op_str(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

fn op_global(module: &str, name: &str) -> Vec<u8> {
    format!("c{module}\n{name}\n").into_bytes()
}

/// `{"w": <call>}` as a protocol-2 pickle, wrapped in a torch-style zip.
fn hostile_checkpoint(call: Vec<u8>, protocol: u8) -> Vec<u8> {
    let mut p = vec![0x80, protocol, b'}'];
    p.extend(op_str("w"));
    p.extend(call);
    p.extend(b"s.");
    zip(&[
        ("archive/data.pkl", &p),
        ("archive/byteorder", b"little"),
        ("archive/version", b"3\n"),
    ])
}

/// Gadgets that would create `target` if the pickle were executed.
fn gadgets(target: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let t = target.display().to_string();
    let touch = format!("touch '{t}'");
    let call1 = |module: &str, name: &str, arg: &str| {
        let mut v = op_global(module, name);
        v.extend(op_str(arg));
        v.extend(b"\x85R"); // TUPLE1, REDUCE
        v
    };
    let popen = {
        let mut v = op_global("subprocess", "Popen");
        v.push(b'(');
        v.extend(op_str("touch"));
        v.extend(op_str(&t));
        v.extend(b"l\x85R"); // LIST, TUPLE1, REDUCE
        v
    };
    let stack_global = {
        let short = |s: &str| {
            let mut v = vec![0x8c, s.len() as u8];
            v.extend(s.as_bytes());
            v
        };
        let mut v = short("os");
        v.extend(short("system"));
        v.push(0x93); // STACK_GLOBAL
        v.extend(op_str(&touch));
        v.extend(b"\x85R");
        v
    };
    vec![
        ("os_system.pt", call1("os", "system", &touch)),
        ("posix_system.pt", call1("posix", "system", &touch)),
        (
            "builtins_exec.pt",
            call1("builtins", "exec", &format!("open({t:?}, 'w').close()")),
        ),
        (
            "builtins_eval.pt",
            call1("builtins", "eval", &format!("open({t:?}, 'w').close()")),
        ),
        ("subprocess_popen.pt", popen),
        ("stack_global_os_system.pt", stack_global),
    ]
}

/// A pickle that would `touch <tmp>/pwned` goes through every entry point (library
/// open/verify/tensor, CLI inspect/verify/convert/diff) and the file never appears.
#[test]
fn canary_pickles_never_execute() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pwned = tmp.path().join("pwned");
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, call) in gadgets(&pwned) {
        let protocol = if name.starts_with("stack_global") {
            4
        } else {
            2
        };
        let path = tmp.path().join(name);
        std::fs::write(&path, hostile_checkpoint(call, protocol)).expect("write");
        files.push(path);
    }
    for path in &files {
        let what = path.display();
        match formats::open(path) {
            Ok(c) => {
                let _ = c.verify();
                for info in c.tensors() {
                    let _ = c.tensor(&info.name);
                }
                panic!("{what}: a pickle calling a forbidden global was opened");
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "{what}: {e}"),
        }
        let out = tmp.path().join("out.safetensors");
        kiln(["inspect".as_ref(), path.as_os_str()]).expect_code(1);
        kiln(["verify".as_ref(), path.as_os_str()]).expect_code(1);
        kiln(["convert".as_ref(), path.as_os_str(), out.as_os_str()]).expect_code(1);
        kiln(["diff".as_ref(), path.as_os_str(), path.as_os_str()]).expect_code(1);
        assert!(
            !out.exists(),
            "{what}: convert wrote output for a refused input"
        );
    }
    assert!(
        !pwned.exists(),
        "a hostile pickle was executed: {} exists",
        pwned.display()
    );

    // Control: each gadget does fire when Python unpickles it, so the canary is live.
    let n = gadgets(&pwned).len();
    let mut controls = Vec::new();
    let mut control_files = Vec::new();
    for i in 0..n {
        let target = tmp.path().join(format!("control-{i}"));
        let (name, call) = gadgets(&target).swap_remove(i);
        let protocol = if name.starts_with("stack_global") {
            4
        } else {
            2
        };
        let file = tmp.path().join(format!("control-{name}"));
        std::fs::write(&file, hostile_checkpoint(call, protocol)).expect("write");
        controls.push((name, target));
        control_files.push(file);
    }
    let script = "import pickle, sys, zipfile\n\
                  for f in sys.argv[1:]:\n    \
                  pickle.loads(zipfile.ZipFile(f).read('archive/data.pkl'))";
    match Command::new("python3")
        .args(["-c", script])
        .args(&control_files)
        .output()
    {
        Ok(out) if out.status.success() => {
            // Popen returns before its child has run: give it a moment.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while controls.iter().any(|(_, t)| !t.exists()) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            for (name, target) in &controls {
                assert!(
                    target.exists(),
                    "control: Python unpickled {name} but {} is missing",
                    target.display()
                );
            }
        }
        Ok(out) => panic!(
            "control: python3 failed to unpickle the gadgets: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => println!("skipping the control half: no python3 ({e})"),
    }
}
