//! `ferry config schema`: the configuration's JSON Schema for editors.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;

/// What to do with the configuration format.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigAction {
    /// Print the JSON Schema of the configuration file (committed as config/ferry.schema.json).
    Schema,
}

/// Runs `ferry config …`.
pub fn run(action: ConfigAction) -> ExitCode {
    match action {
        ConfigAction::Schema => {
            let mut out = std::io::stdout().lock();
            match out.write_all(ferry_config::json_schema_text().as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
    }
}
