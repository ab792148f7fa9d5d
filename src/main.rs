//! Entry point: parse the command line, run the command, print any error chain whole and
//! turn it into a distinct exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = zopilot_gpu::cli::Cli::parse();
    match zopilot_gpu::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            zopilot_gpu::commands::exit_code_for(&e)
        }
    }
}
