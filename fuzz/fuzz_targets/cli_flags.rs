//! The command line: any argument list is parsed into a command or refused with an error,
//! never a panic. Uses the binary's own `cli` module.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/cli.rs"]
mod cli;

fuzz_target!(|args: Vec<String>| {
    let argv = std::iter::once("proxy".to_string()).chain(args);
    let _ = cli::Cli::try_parse_from(argv);
});
