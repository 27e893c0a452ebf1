//! `ebb pg base-backup|archive-push|archive-get|restore|serve`: PostgreSQL's base
//! backups, its archive_command and restore_command, point-in-time restores, and a
//! server at any moment (`pg_serve`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use jiff::Timestamp;
use streamer::pg::delegate;
use streamer::pg::dsn::Dsn;

use crate::cli::{Global, PgCommand, UsageError};
use crate::context::{archive_get_command, host, open, repo_url, source_or_host};
use crate::output::bytes;

pub async fn pg(g: &Global, cmd: PgCommand) -> Result<ExitCode> {
    match cmd {
        PgCommand::BaseBackup { source, dsn: text } => {
            let source = source_or_host(source)?;
            let dsn = Dsn::parse(&text).map_err(|e| UsageError(e.to_string()))?;
            let repo = open(g).await?;
            let (point, m) = streamer::pg::basebackup::base_backup(&repo, &dsn.base_backup(&source, host())).await?;
            let pg = m.pg.as_ref().expect("a base backup records its WAL");
            println!(
                "base backup {} of source {source} saved: timeline {}, WAL {} to {}, {} files, {} added",
                point.time,
                pg.timeline,
                pg.start_lsn,
                pg.stop_lsn,
                m.stats.files,
                bytes(m.stats.new_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        PgCommand::ArchivePush { source, read_ahead, state_dir, pusher, path } => {
            let source = source_or_host(source)?;
            let url = repo_url(g)?;
            let ahead = delegate::read_ahead(state_dir, &url, &source, read_ahead);
            if pusher {
                let ra = ahead.context("the pusher needs --read-ahead above 0 and a state directory")?;
                let repo = open(g).await?;
                let wal_dir = path.parent().unwrap_or(Path::new("."));
                streamer::pg::archive::run_pusher(&repo, &source, wal_dir, &ra).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let said = match &ahead {
                // Pushed ahead: answered without opening the repository.
                Some(ra) => {
                    let pusher = std::env::args_os().skip(1).chain(["--pusher".into()]);
                    delegate::push_ahead(ra, &path, pusher).await?
                }
                None => None,
            };
            let said = match said {
                Some(said) => said,
                None => {
                    let repo = open(g).await?;
                    streamer::pg::archive::archive_push(&repo, &source, &path).await?
                }
            };
            if !g.quiet {
                eprintln!("{said}");
            }
            Ok(ExitCode::SUCCESS)
        }
        PgCommand::ArchiveGet { source, prefetch, spool, fetcher, until, walname, dest } => {
            let source = source_or_host(source)?;
            let spool = delegate::spool(spool, &dest, prefetch, until);
            if fetcher {
                let spool = spool.context("the fetcher needs --prefetch above 0")?;
                // A helper keeps no directory busy: the data directory it was started
                // in may be a mount (`ebb pg serve`) that is to be unmounted.
                std::env::set_current_dir("/").context("leave the data directory")?;
                let repo = open(g).await?;
                streamer::pg::spool::run_fetcher(&repo, &source, &spool).await?;
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(spool) = &spool {
                let fetcher = std::env::args_os().skip(1).chain(["--fetcher".into()]);
                match delegate::fetch_ahead(spool, &walname, &dest, fetcher).await {
                    // Fetched ahead: answered without opening the repository.
                    Ok(true) => return Ok(ExitCode::SUCCESS),
                    Ok(false) => {}
                    // Fetching ahead is only faster: the call fetches its segment itself.
                    Err(e) => tracing::warn!("cannot fetch ahead ({e:#}); fetching {walname} alone"),
                }
            }
            let got = async {
                let repo = open(g).await?;
                Ok::<_, anyhow::Error>(
                    streamer::pg::archive::archive_get(&repo, &source, &walname, &dest, until).await?,
                )
            }
            .await;
            if let (Ok(true), Some(spool)) = (&got, &spool) {
                spool.served(&walname);
            }
            match got {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => {
                    if !g.quiet {
                        eprintln!("ebb: {walname} is not in the repository (source {source})");
                    }
                    Ok(ExitCode::FAILURE)
                }
                // Not "missing": PostgreSQL would end recovery early. An exit status
                // above 125 makes it stop recovery instead, to be started again.
                Err(e) => {
                    eprintln!("ebb: cannot fetch {walname}: {e:#}");
                    Ok(ExitCode::from(126))
                }
            }
        }
        PgCommand::Serve(args) => super::pg_serve::serve(g, *args).await,
        PgCommand::Dump(args) => super::pg_serve::dump(g, *args).await,
        PgCommand::Restore { at, source, prefetch, datadir } => {
            let source = source_or_host(source)?;
            let archive_get = archive_get_command(g, &source, prefetch)?;
            match std::fs::read_dir(&datadir).map(|mut d| d.next().is_some()) {
                Ok(true) => return Err(UsageError(format!("{} is not empty", datadir.display())).into()),
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(UsageError(format!("{}: {e}", datadir.display())).into()),
            }
            let now = Timestamp::now();
            let at = at.instant(now);
            if at > now {
                return Err(UsageError(format!("{at} is in the future (it is now {now})")).into());
            }
            let repo = open(g).await?;
            let opts = streamer::pg::restore::PgRestoreOptions {
                source: source.clone(),
                at,
                target: datadir.clone(),
                archive_get,
            };
            super::restore::return_large_buffers();
            let r = streamer::pg::restore::pg_restore(&repo, &opts).await?;
            for w in &r.files.warnings {
                eprintln!("warning: {w}");
            }
            let how = if r.target_time {
                format!("recovers to {at}")
            } else {
                format!(
                    "replays all stored WAL (to {}): no transaction ended after {at}",
                    streamer::pg::lsn::text(r.wal_end)
                )
            };
            println!(
                "restored base backup {} of source {source} into {} ({} files); starting PostgreSQL on it {how}, \
                 on timeline {}",
                r.point.time,
                datadir.display(),
                r.files.files,
                r.timeline
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
