//! Entry point: parse the command line, run the command, print any error chain whole and
//! turn it into a distinct exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything else: a CUDA build that the loader gave the driver stub re-executes
    // itself with the real driver when one exists (see preflight/driver.rs).
    zopilot_gpu::preflight::driver::reexec_with_real_driver();
    let cli = zopilot_gpu::cli::Cli::parse();
    match zopilot_gpu::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            zopilot_gpu::commands::exit_code_for(&e)
        }
    }
}
