//! `ebb stream pg` and `ebb pg ...`: PostgreSQL sources.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use jiff::Timestamp;
use streamer::pg::archive::Delegated;
use streamer::pg::walstream::PgStreamOptions;
use streamer::state;

use crate::cli::{Global, PgCommand, PgStreamArgs};
use crate::context::{host, open, repo_url, source_or_host};
use crate::UsageError;

/// The DSN parsed, with the password from PGPASSWORD when it gives none, and how to
/// show it (without the password).
fn dsn(text: &str) -> Result<(streamer::pg::tokio_postgres::Config, String)> {
    let mut cfg = streamer::pg::parse_dsn(text).map_err(|e| UsageError(e.to_string()))?;
    if cfg.get_password().is_none() {
        if let Ok(pw) = std::env::var("PGPASSWORD") {
            cfg.password(pw);
        }
    }
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            streamer::pg::tokio_postgres::config::Host::Tcp(h) => h.clone(),
            streamer::pg::tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let mut shown = format!("host={}", if hosts.is_empty() { "(default socket)".into() } else { hosts.join(",") });
    if let Some(p) = cfg.get_ports().first() {
        shown.push_str(&format!(" port={p}"));
    }
    shown.push_str(&format!(" user={}", streamer::pg::wire::dsn_user(&cfg)));
    Ok((cfg, shown))
}

pub async fn stream_pg(g: &Global, a: PgStreamArgs) -> Result<ExitCode> {
    let source = source_or_host(a.source)?;
    let (cfg, shown) = dsn(&a.dsn)?;
    let slot = a.slot.unwrap_or_else(|| streamer::pg::default_slot(&source));
    let url = repo_url(g)?;
    let state_file = crate::stream::claim_stream(a.state_dir, &url, &source)?;
    let metrics = crate::stream::serve_metrics(&source, a.rpo, a.metrics_addr).await?;
    let repo = open(g).await?;
    let opts = PgStreamOptions {
        source: source.clone(),
        dsn: cfg.clone(),
        dsn_display: shown.clone(),
        slot: slot.clone(),
        flush_interval: a.flush_interval,
        rpo: a.rpo,
        repository: url.clone(),
        state_file,
    };
    if let Some(every) = a.base_backup_every {
        let (repo, bb) = (repo.clone(), base_backup_options(&source, cfg, shown.clone()));
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                match streamer::pg::basebackup::base_backup(&repo, &bb).await {
                    Ok((point, _)) => {
                        metrics.newest_point(point.time);
                        tracing::info!("base backup {} of {} saved", point.time, bb.source)
                    }
                    Err(e) => tracing::error!("base backup of {} failed: {e}", bb.source),
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    eprintln!("streaming WAL of {shown} as {source} to {url} (slot {slot}); stop with Ctrl-C or SIGTERM");
    crate::stream::holding(&repo, &source, "stream pg", async {
        streamer::pg::walstream::stream_pg(repo.clone(), opts, metrics, crate::stream::stop_requested())
            .await
            .map_err(anyhow::Error::from)
    })
    .await?;
    eprintln!("stopped streaming {source}");
    Ok(ExitCode::SUCCESS)
}

fn base_backup_options(
    source: &str,
    dsn: streamer::pg::tokio_postgres::Config,
    shown: String,
) -> streamer::pg::basebackup::BaseBackupOptions {
    streamer::pg::basebackup::BaseBackupOptions { source: source.to_string(), dsn, dsn_display: shown, host: host() }
}

/// A word for `sh -c`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The restore_command a restored server runs: this ebb, this repository, the same
/// key or password file, so nothing secret is written into the data directory.
fn archive_get_command(g: &Global, source: &str) -> Result<String> {
    let exe = std::env::current_exe().context("find the ebb executable")?;
    let mut cmd = vec![shell_quote(&exe.to_string_lossy()), "--repo".into(), shell_quote(&repo_url(g)?)];
    let absolute = |p: &Path| std::path::absolute(p).map(|p| shell_quote(&p.to_string_lossy()));
    if let Some(k) = &g.key_file {
        cmd.extend(["--key-file".into(), absolute(k)?]);
    } else if let Some(p) = &g.password_file {
        cmd.extend(["--password-file".into(), absolute(p)?]);
    } else {
        return Err(UsageError(
            "PostgreSQL fetches WAL by running ebb itself (restore_command), as the server's user: give the \
             secret as --key-file or --password-file (EBB_KEY_FILE, EBB_PASSWORD_FILE), a file that user can read"
                .into(),
        )
        .into());
    }
    cmd.extend(["pg".into(), "archive-get".into(), "--source".into(), shell_quote(source)]);
    Ok(cmd.join(" "))
}

/// Starts this same `archive-push` again as the background pusher, detached, with
/// its messages in `pusher.log` (of the last pusher) where it notes segments.
fn start_pusher(dir: &Path) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("find the ebb executable")?;
    streamer::state::private_dir(dir).with_context(|| format!("create {}", dir.display()))?;
    let log = dir.join("pusher.log");
    let log = streamer::state::create_private(&log).with_context(|| format!("open {}", log.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1)).arg("--pusher");
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(log);
    // SAFETY: setsid is async-signal-safe; the pusher outlives this call.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("start the archive pusher")
}

pub async fn pg(g: &Global, cmd: PgCommand) -> Result<ExitCode> {
    match cmd {
        PgCommand::BaseBackup { source, dsn: text } => {
            let source = source_or_host(source)?;
            let (cfg, shown) = dsn(&text)?;
            let repo = open(g).await?;
            let (point, m) =
                streamer::pg::basebackup::base_backup(&repo, &base_backup_options(&source, cfg, shown)).await?;
            let pg = m.pg.as_ref().expect("a base backup records its WAL");
            println!(
                "base backup {} of source {source} saved: timeline {}, WAL {} to {}, {} files, {} added",
                point.time,
                pg.timeline,
                pg.start_lsn,
                pg.stop_lsn,
                m.stats.files,
                crate::output::bytes(m.stats.new_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        PgCommand::ArchivePush { source, read_ahead, state_dir, pusher, path } => {
            let source = source_or_host(source)?;
            let url = repo_url(g)?;
            let ahead = state_dir.or_else(state::default_state_dir).filter(|_| read_ahead > 0).map(|dir| {
                let file = state::state_file(&dir, &url, &source);
                streamer::pg::archive::ReadAhead { dir: file.with_extension("pushed"), segments: read_ahead }
            });
            if pusher {
                let ra = ahead.context("the pusher needs --read-ahead above 0 and a state directory")?;
                let repo = open(g).await?;
                let wal_dir = path.parent().unwrap_or(Path::new("."));
                streamer::pg::archive::run_pusher(&repo, &source, wal_dir, &ra).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let said = match &ahead {
                // Pushed ahead: answered without opening the repository.
                Some(ra) if ra.pushed(&path) => Some(format!("{} was already archived (pushed ahead)", path.display())),
                Some(ra) if ra.takes(&path) => {
                    let started = if ra.pusher_running() { None } else { Some(start_pusher(&ra.dir)?) };
                    match ra.wait(&path, started).await {
                        Delegated::Pushed => Some(format!("archived {}", path.display())),
                        Delegated::Failed(why) => bail!("{why}"),
                        Delegated::PusherGone => None,
                    }
                }
                _ => None,
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
        PgCommand::ArchiveGet { source, walname, dest } => {
            let source = source_or_host(source)?;
            let got = async {
                let repo = open(g).await?;
                Ok::<_, anyhow::Error>(streamer::pg::archive::archive_get(&repo, &source, &walname, &dest).await?)
            }
            .await;
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
        PgCommand::Restore { at, source, datadir } => {
            let source = source_or_host(source)?;
            let archive_get = archive_get_command(g, &source)?;
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
