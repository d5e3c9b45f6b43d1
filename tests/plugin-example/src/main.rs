//! `kiln-null`: lists the backends this program links (kiln's CPU backend and the `null`
//! plugin) as `kiln backends` does, and resolves a device string as training does.
//!
//! Usage: `kiln-null [--json] [--device SPEC]`. Errors: one line on stderr, exit 1 (2 for
//! a malformed command line or device string).

use std::process::ExitCode;

// Link the backends: without these lines their registrations would not be in the binary.
use kiln_backend_cpu as _;
use kiln_backend_null as _;

fn main() -> ExitCode {
    let mut json = false;
    let mut device = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--device" => match args.next() {
                Some(spec) => device = Some(spec),
                None => return usage("--device needs a value"),
            },
            other => return usage(&format!("unexpected argument {other:?}")),
        }
    }
    if let Some(spec) = device {
        return match kiln_backend::select(&spec) {
            Ok(s) => {
                println!("{}: {}", s.spec(), s.info.name);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kiln-null: {e}");
                ExitCode::from(if e.is_usage() { 2 } else { 1 })
            }
        };
    }
    let report = kiln_backend::report();
    if json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("kiln-null: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", kiln_backend::text(&report));
    }
    ExitCode::SUCCESS
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("kiln-null: {msg}; usage: kiln-null [--json] [--device SPEC]");
    ExitCode::from(2)
}
