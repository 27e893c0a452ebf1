//! The commands, one module each: open the repository, call the library, print
//! the result. `run` dispatches a parsed command line to its module.

mod backup;
mod forget;
mod init;
mod key;
mod mount;
mod pg;
mod pg_serve;
mod points;
mod policy;
mod prune;
mod repair;
mod restore;
mod sources;
mod status;
mod stream;
mod umount;
mod verify;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command, PolicyCommand, RepairCommand, StreamCommand};

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Init => init::init(g).await,
        Command::Key(k) => key::key(g, k).await,
        Command::Backup { source, exclude, json, allow_skipped, path } => {
            backup::backup(g, source, exclude, json, allow_skipped, path).await
        }
        Command::Sources { json } => sources::sources(g, json).await,
        Command::Points { source, since, until, json } => points::points(g, source, since, until, json).await,
        Command::Restore { at, source, path, overwrite, memory, json, target } => {
            let how = restore::How { overwrite, memory, json };
            restore::restore(g, at, source, path, target, how).await
        }
        Command::Policy(PolicyCommand::Set(args)) => policy::set(g, args).await,
        Command::Policy(PolicyCommand::Show { source, json }) => policy::show(g, source, json).await,
        Command::Forget { source, dry_run, json } => forget::forget(g, source, dry_run, json).await,
        Command::Prune { dry_run, max_unused, memory, json } => {
            prune::prune(g, dry_run, max_unused, memory, json).await
        }
        Command::Verify { read_data, json } => verify::verify(g, read_data, json).await,
        Command::Repair(RepairCommand::Index) => repair::index(g).await,
        Command::Repair(RepairCommand::Config) => repair::config(g).await,
        Command::Mount { at, source, cache_size, cache_dir, cache_dir_size, foreground, handoff, mountpoint } => {
            let caches = mount::Caches { memory: cache_size, dir: cache_dir, dir_size: cache_dir_size };
            mount::mount(g, at, source, caches, foreground, handoff, &mountpoint).await
        }
        Command::Umount { mountpoint } => umount::umount(&mountpoint),
        Command::Stream(StreamCommand::Dir(dir)) => stream::dir(g, dir).await,
        Command::Stream(StreamCommand::Pg(a)) => stream::pg(g, a).await,
        Command::Pg(cmd) => pg::pg(g, cmd).await,
        Command::Status { state_dir, json } => status::status(g, state_dir, json).await,
    }
}
