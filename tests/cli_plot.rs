//! `kiln plot` through the binary, on runs the binary trained: the PNG decodes at the
//! size asked (one panel per metric), each run's curve is drawn in its own colour, the
//! SVG names the panels, runs and markers; a run whose final state is missing (crashed)
//! plots from its newest checkpoint; bad paths, formats, metrics and sizes are refused
//! in one line and write nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{kiln, logged_gpt2_args};

/// A tiny GPT-2 for 6 steps, logged every step, evaluated and saved every 2, the best
/// checkpoint (by eval_loss) loaded at the end.
fn train(out: &Path, lr: &str) {
    let extra = [
        "--max_steps",
        "6",
        "--learning_rate",
        lr,
        "--load_best_model_at_end",
        "true",
    ];
    kiln(logged_gpt2_args(out, &extra)).expect_success();
}

/// (width, height, RGB pixels) of a PNG file.
fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Pixels of exactly `rgb`.
fn count(pixels: &[u8], rgb: [u8; 3]) -> usize {
    pixels.chunks_exact(3).filter(|p| *p == rgb).count()
}

/// The first two colours of plotters' Palette99: runs 0 and 1.
const RUN0: [u8; 3] = [230, 25, 75];
const RUN1: [u8; 3] = [60, 180, 75];

#[test]
fn plots_runs_as_png_and_svg() {
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("slow");
    let b = work.path().join("fast");
    train(&a, "1e-4");
    train(&b, "1e-3");

    // One run, default output in its folder: loss, eval_loss, learning_rate panels.
    let one = kiln(["plot", a.to_str().unwrap()]);
    one.expect_success();
    let default = a.join("training_curves.png");
    assert!(
        one.stdout.contains(default.to_str().unwrap()),
        "{}",
        one.stdout
    );
    assert!(
        one.stdout
            .contains("loss, eval_loss, learning_rate of slow"),
        "{}",
        one.stdout
    );
    let (w, h, px) = decode(&default);
    assert_eq!((w, h), (1000, 3 * 280));
    assert!(count(&px, RUN0) > 500, "run 0's curves are not drawn");
    assert_eq!(count(&px, RUN1), 0);

    // Two runs on one figure: both colours, in each panel.
    let fig = work.path().join("compare.png");
    kiln([
        "plot",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        fig.to_str().unwrap(),
    ])
    .expect_success();
    let (w, h, px) = decode(&fig);
    assert_eq!((w, h), (1000, 840));
    let panel = (w * 280 * 3) as usize;
    for (i, p) in px.chunks(panel).enumerate() {
        assert!(
            count(p, RUN0) > 100 && count(p, RUN1) > 100,
            "panel {i} lacks a run"
        );
    }

    // SVG, chosen metrics, asked size: text names panels, runs and markers.
    let svg = work.path().join("fig.svg");
    let s = kiln([
        "plot",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        svg.to_str().unwrap(),
        "--metric",
        "eval_loss",
        "--metric",
        "grad_norm",
        "--size",
        "800x500",
    ]);
    s.expect_success();
    assert!(
        s.stdout
            .contains("(800x500): eval_loss, grad_norm of slow, fast"),
        "{}",
        s.stdout
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg")
            && text.contains("width=\"800\"")
            && text.contains("height=\"500\"")
    );
    // plotters writes each text element's string on its own line.
    for label in [
        "eval_loss",
        "grad_norm",
        "slow",
        "fast",
        "checkpoint",
        "best checkpoint",
        "step",
    ] {
        assert!(
            text.contains(&format!(">\n{label}\n</text>")),
            "{label} not in the SVG"
        );
    }

    // A crashed run (no final trainer_state.json): its newest checkpoint's state.
    std::fs::remove_file(b.join("trainer_state.json")).unwrap();
    let crashed = work.path().join("crashed.svg");
    kiln([
        "plot",
        b.to_str().unwrap(),
        "--out",
        crashed.to_str().unwrap(),
    ])
    .expect_success();
    assert!(
        std::fs::read_to_string(&crashed)
            .unwrap()
            .contains(">\nfast\n</text>")
    );
    // A checkpoint folder, and a trainer_state.json file, directly.
    let ckpt = b.join("checkpoint-4");
    let c = kiln([
        "plot",
        ckpt.to_str().unwrap(),
        "--out",
        work.path().join("c.png").to_str().unwrap(),
    ]);
    c.expect_success();
    assert!(c.stdout.contains("of checkpoint-4"), "{}", c.stdout);
    let f = kiln(["plot", ckpt.join("trainer_state.json").to_str().unwrap()]);
    f.expect_success();
    assert!(ckpt.join("training_curves.png").is_file());
}

/// Exit 2 (a usage error) with one stderr line naming every one of `words`.
fn refused(e: &kiln_test_support::bin::Run, words: &[&str]) {
    e.expect_code(2);
    let line = e.one_stderr_line();
    for w in words {
        assert!(line.contains(w), "{w:?} not in: {line}");
    }
}

#[test]
fn refuses_what_it_cannot_plot_in_one_line() {
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("run");
    train(&a, "1e-3");
    let w = work.path();
    let run = a.to_str().unwrap();

    let e = kiln(["plot", w.join("nowhere").to_str().unwrap()]);
    refused(&e, &["nowhere", "no such file or folder"]);
    let e = kiln(["plot", w.to_str().unwrap()]);
    refused(&e, &["no trainer_state.json"]);

    let jpg = w.join("fig.jpg");
    let e = kiln(["plot", run, "--out", jpg.to_str().unwrap()]);
    refused(&e, &["fig.jpg", ".png or .svg"]);
    assert!(!jpg.exists());

    let out = w.join("fig.png");
    for (flag, value, words) in [
        (
            "--metric",
            "eval_bleu",
            &["--metric eval_bleu", "not logged", "eval_loss"][..],
        ),
        ("--size", "150x100", &["--size 150x100", "too small"]),
        ("--size", "99999x500", &["--size 99999x500", "16384"]),
    ] {
        let e = kiln(["plot", run, "--out", out.to_str().unwrap(), flag, value]);
        refused(&e, words);
    }
    assert!(!out.exists());
    let e = kiln(["plot", run, "--size", "big"]);
    e.expect_code(2);
    assert!(e.stderr.contains("WIDTHxHEIGHT"), "{}", e.stderr);
}
