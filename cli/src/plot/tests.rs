#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use kiln_checkpoint::state::TrainerState;

use super::{ImageFormat, Run, best_point, choose_metrics, padded, render};

/// A state as transformers writes it: train logs every 2 steps, evaluations every 4,
/// the best at step 4, and the end-of-training summary.
fn state() -> TrainerState {
    let text = r#"{
      "best_global_step": 4, "best_metric": 0.5,
      "best_model_checkpoint": "run/checkpoint-4",
      "epoch": 1.0, "eval_steps": 4, "global_step": 8, "is_hyper_param_search": false,
      "is_local_process_zero": true, "is_world_process_zero": true,
      "log_history": [
        {"epoch": 0.25, "grad_norm": 1.5, "learning_rate": 4e-05, "loss": 2.0, "step": 2},
        {"epoch": 0.5, "grad_norm": 1.2, "learning_rate": 3e-05, "loss": 1.5, "step": 4},
        {"epoch": 0.5, "eval_accuracy": 0.75, "eval_loss": 0.5, "eval_runtime": 0.1,
         "eval_samples_per_second": 80.0, "eval_steps_per_second": 10.0, "step": 4},
        {"epoch": 0.75, "grad_norm": 1.1, "learning_rate": 2e-05, "loss": 1.25, "step": 6},
        {"epoch": 1.0, "grad_norm": 0.9, "learning_rate": 1e-05, "loss": 1.0, "step": 8},
        {"epoch": 1.0, "eval_accuracy": 0.7, "eval_loss": 0.6, "eval_runtime": 0.1,
         "eval_samples_per_second": 80.0, "eval_steps_per_second": 10.0, "step": 8},
        {"epoch": 1.0, "step": 8, "total_flos": 1000.0, "train_loss": 1.4375,
         "train_runtime": 2.0, "train_samples_per_second": 16.0, "train_steps_per_second": 4.0}
      ],
      "logging_steps": 2, "max_steps": 8, "num_input_tokens_seen": 0, "num_train_epochs": 1,
      "save_steps": 4, "stateful_callbacks": {}, "total_flos": 1000.0,
      "train_batch_size": 4, "trial_name": null, "trial_params": null
    }"#;
    TrainerState::from_json(text).unwrap()
}

fn run() -> Run {
    Run::from_state("run", state(), vec![4, 8])
}

#[test]
fn series_and_metrics_come_from_log_history() {
    let r = run();
    assert_eq!(r.best, Some((4, Some(0.5))));
    assert_eq!(r.global_step, 8);
    assert_eq!(
        r.series("loss"),
        vec![(2.0, 2.0), (4.0, 1.5), (6.0, 1.25), (8.0, 1.0)]
    );
    assert_eq!(r.series("eval_loss"), vec![(4.0, 0.5), (8.0, 0.6)]);
    // The summary entry and the timings are not curves.
    let m: Vec<String> = r.metrics().into_iter().collect();
    assert_eq!(
        m,
        [
            "eval_accuracy",
            "eval_loss",
            "grad_norm",
            "learning_rate",
            "loss"
        ]
    );
    assert_eq!(best_point(&r, "eval_loss"), Some((4.0, 0.5)));
    assert_eq!(best_point(&r, "eval_accuracy"), None);
}

#[test]
fn default_metrics_are_losses_evaluations_and_learning_rate() {
    let runs = [run()];
    assert_eq!(
        choose_metrics(&runs, &[]).unwrap(),
        ["loss", "eval_loss", "eval_accuracy", "learning_rate"]
    );
    let asked = [
        "grad_norm".to_string(),
        "loss".to_string(),
        "loss".to_string(),
    ];
    assert_eq!(
        choose_metrics(&runs, &asked).unwrap(),
        ["grad_norm", "loss"]
    );
    let e = choose_metrics(&runs, &["eval_f1".to_string()]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--metric eval_f1: not logged by any run; logged: eval_accuracy, eval_loss, \
         grad_norm, learning_rate, loss"
    );
}

#[test]
fn output_formats_and_ranges() {
    assert_eq!(
        ImageFormat::of(Path::new("a/b.PNG")).unwrap(),
        ImageFormat::Png
    );
    assert_eq!(
        ImageFormat::of(Path::new("b.svg")).unwrap(),
        ImageFormat::Svg
    );
    let e = ImageFormat::of(Path::new("b.jpg")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--out b.jpg: the file must end in .png or .svg"
    );
    assert_eq!(padded(0.0, 10.0), (-0.5, 10.5));
    assert_eq!(padded(2.0, 2.0), (1.9, 2.1));
    assert_eq!(padded(0.0, 0.0), (-1.0, 1.0));
}

#[test]
fn renders_png_and_svg_of_the_asked_size() {
    let runs = [run(), Run::from_state("other", state(), vec![])];
    let metrics = choose_metrics(&runs, &[]).unwrap();
    let png = render(&runs, &metrics, ImageFormat::Png, 640, 800).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png.bytes().to_vec()));
    let mut reader = decoder.read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (640, 800));
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();
    // Not blank: the curves' colours are there besides white, grey and black.
    let coloured = buf
        .chunks(3)
        .filter(|p| p.iter().max().unwrap() - p.iter().min().unwrap() > 60)
        .count();
    assert!(coloured > 500, "{coloured} coloured pixels");

    let svg = render(&runs, &metrics, ImageFormat::Svg, 640, 800).unwrap();
    let text = std::str::from_utf8(svg.bytes()).unwrap();
    assert!(
        text.starts_with("<svg") && text.contains("width=\"640\""),
        "{}",
        &text[..80]
    );
    for label in ["eval_accuracy", "learning_rate", "best checkpoint", "other"] {
        assert!(text.contains(label), "{label} missing");
    }

    let e = render(&runs, &metrics, ImageFormat::Png, 640, 300).unwrap_err();
    assert!(e.to_string().contains("too small for 4 panels"), "{e}");
}
