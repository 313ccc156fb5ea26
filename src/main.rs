//! The `tern` binary: parse the CLI, set up logging, dispatch, map errors to exit codes.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

use tern::cli::{Cli, Command};

/// glibc malloc is the default (benches/README.md, "Choosing the allocator"); `--features mimalloc`
/// trades about 0.5 MiB of idle memory for about 7% fewer instructions per proxied request.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The demo prints its own report; its default log level keeps proxy chatter out of it.
    if matches!(cli.command, Command::Demo(_)) && std::env::var_os("TERN_LOG").is_none() {
        cli.log.filter = "warn".into();
    }
    if let Err(e) = tern::logging::init(&cli.log) {
        eprintln!("tern: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Proxy(args) => tern::app::main(&args),
        Command::Init(args) => tern::init::main(&args),
        Command::Demo(args) => tern::demo::main(&args),
        Command::Inject(args) => tern::inject::cli::main(&args),
        Command::Injector(args) => tern::inject::webhook::main(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tern: {e:#}");
            ExitCode::FAILURE
        }
    }
}
