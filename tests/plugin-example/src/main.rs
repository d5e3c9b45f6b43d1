//! `kiln-example`: kiln's command with this crate's backend and architecture linked, so
//! `kiln-example backends` lists `null` and `kiln-example train` trains
//! `BagOfWordsForSequenceClassification`.

use kiln_plugin_example as _;

fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
