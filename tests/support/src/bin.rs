//! The `kiln` binary in tests: finding it beside the test executable, running it, and
//! checking what a run gave ([`Run`]).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

/// The `kiln` binary of this build: `target/<profile>/kiln`, beside the `deps/` folder
/// the running test executable lives in (cargo builds it for `cargo test --workspace`
/// through kiln-cli's tests). Tests inside kiln-cli use `env!("CARGO_BIN_EXE_kiln")`.
pub fn kiln_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/debug/deps/cli-0123abcd -> target/debug/kiln
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/<profile>/deps/");
        let bin = profile_dir.join(format!("kiln{}", std::env::consts::EXE_SUFFIX));
        assert!(
            bin.is_file(),
            "{} is missing: build the CLI first with `cargo build -p kiln-cli` \
             (or run `cargo test --workspace`, which builds it)",
            bin.display()
        );
        bin
    })
    .clone()
}

/// Runs `bin` with `args` and returns what it did.
pub fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

/// A stream's bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs [`kiln_bin`] with `args` (without `RUST_BACKTRACE`, so that a panic shows as one).
pub fn kiln<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let out = Command::new(kiln_bin())
        .args(&args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("run kiln");
    Run::from_output(shown, out)
}

/// What a run of `kiln` gave.
#[derive(Debug)]
pub struct Run {
    /// The arguments, for messages.
    pub args: Vec<String>,
    /// The exit code; `None` if a signal ended it (a crash).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The run of a command given `args` (kept for messages) that gave `out`.
    pub fn from_output(args: Vec<String>, out: Output) -> Run {
        Run {
            args,
            code: out.status.code(),
            stdout: text(&out.stdout),
            stderr: text(&out.stderr),
        }
    }

    /// Panics with the whole run unless it exited with `code`.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "kiln {:?}: expected exit {code}\n--- stdout\n{}\n--- stderr\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        self.expect_no_panic()
    }

    pub fn expect_success(&self) -> &Run {
        self.expect_code(0)
    }

    pub fn expect_no_panic(&self) -> &Run {
        for (what, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            assert!(
                !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
                "kiln {:?} panicked ({what}):\n{text}",
                self.args
            );
        }
        assert!(
            self.code.is_some(),
            "kiln {:?} was killed by a signal (crash?)\n{}",
            self.args,
            self.stderr
        );
        self
    }

    /// Panics unless stderr is exactly one non-empty line; returns it.
    pub fn one_stderr_line(&self) -> &str {
        let line = self.stderr.strip_suffix('\n').unwrap_or(&self.stderr);
        assert!(
            !line.trim().is_empty() && !line.contains('\n'),
            "kiln {:?}: expected one line on stderr, got:\n{}",
            self.args,
            self.stderr
        );
        line
    }

    /// Exit 1 with one line on stderr that contains one of `keywords` (case-insensitive).
    pub fn expect_error(&self, keywords: &[&str]) -> &str {
        self.expect_code(1);
        let line = self.one_stderr_line();
        assert_mentions(line, keywords, &format!("kiln {:?}", self.args));
        line
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "kiln {:?}: stdout is not JSON ({e}):\n{}",
                self.args, self.stdout
            )
        })
    }
}

/// Panics unless `text` contains one of `keywords`, ignoring case.
pub fn assert_mentions(text: &str, keywords: &[&str], context: &str) {
    let lower = text.to_lowercase();
    assert!(
        keywords.iter().any(|k| lower.contains(&k.to_lowercase())),
        "{context}: message should say what is wrong (one of {keywords:?}), got: {text}"
    );
}
