//! `ebb`: the command line. Parses and validates flags, then calls the libraries.

mod cli;
mod commands;
mod context;
mod output;
mod secret;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Buffers of 1 MiB and more (packs being filled, spans of packs being read) are
/// mapped on their own and unmapped when freed. glibc otherwise raises its
/// threshold to the largest buffer freed and keeps the next ones in its arenas,
/// one per thread: that doubled the peak RSS of a prune that repacks. Called
/// before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn large_buffers_go_back_when_freed() {
    // SAFETY: mallopt only sets an allocator parameter, here before any thread starts.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn large_buffers_go_back_when_freed() {}

fn main() -> ExitCode {
    // Everything ebb creates is the user's alone: repository objects on file:// (key
    // slots among them, which other users could otherwise copy and attack offline),
    // state, logs and caches are 0600, their directories 0700. Restore sets each
    // entry's own mode after creating it.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
    let cli = cli::Cli::parse();
    // Not where WAL segments come one after another: each would be mapped afresh,
    // its pages faulted in and zeroed (a quarter of `pg serve`'s planning), where
    // the allocator would reuse the last one's.
    if !cli.churns_segments() {
        large_buffers_go_back_when_freed();
    }
    if cli.unlocks_with_password() {
        catalog::prepare_kdf_memory();
    }
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    // fuser warns about every unmount it did not start itself, and calls a reply the
    // kernel no longer waits for an error (the request was interrupted: a reader
    // killed mid-read, a server stopped with an immediate shutdown); ebb reports
    // what matters.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},fuser=error,fuser::reply=off")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("start the async runtime");
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ebb: {e:#}");
            if e.is::<cli::UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
