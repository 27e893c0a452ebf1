//! One function per command: open the repository, call the library, print the result.

use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use catalog::time::TimeSpec;
use catalog::{Manifest, PointRef, RepoError, Repository, Secret, Store};
use jiff::Timestamp;
use serde_json::json;

use crate::cli::{Cli, Command, Global, KeyCommand, RepairCommand};
use crate::context::{file_workers, host, open, repo_url, source_or_host, walk_excludes};
use crate::output::{bytes, spinner, table};
use crate::secret::{new_password, secret};
use crate::UsageError;

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Init => init(g).await,
        Command::Key(k) => key(g, k).await,
        Command::Backup { source, exclude, json, allow_skipped, path } => {
            backup(g, source, exclude, json, allow_skipped, path).await
        }
        Command::Sources { json } => sources(g, json).await,
        Command::Points { source, since, until, json } => points(g, source, since, until, json).await,
        Command::Restore { at, source, path, target } => restore(g, at, source, path, target).await,
        Command::Verify { read_data, json } => verify(g, read_data, json).await,
        Command::Repair(RepairCommand::Index) => repair_index(g).await,
        Command::Repair(RepairCommand::Config) => repair_config(g).await,
        Command::Mount { at, source, cache_size, cache_dir, cache_dir_size, foreground, handoff, mountpoint } => {
            let caches = crate::mount::Caches { memory: cache_size, dir: cache_dir, dir_size: cache_dir_size };
            if foreground {
                crate::mount::reexec_with_huge_pages();
                crate::mount::mount(g, at, source, caches, &mountpoint, handoff).await
            } else {
                crate::mount::start_daemon(g, &mountpoint).await
            }
        }
        Command::Umount { mountpoint } => crate::mount::umount(&mountpoint),
        Command::Stream(crate::cli::StreamCommand::Dir(dir)) => crate::stream::stream_dir(g, dir).await,
        Command::Stream(crate::cli::StreamCommand::Pg(a)) => crate::pg::stream_pg(g, a).await,
        Command::Pg(cmd) => crate::pg::pg(g, cmd).await,
        Command::Status { state_dir, json } => crate::stream::status(g, state_dir, json).await,
    }
}

async fn init(g: &Global) -> Result<ExitCode> {
    let url = repo_url(g)?;
    if url.starts_with("memory://") {
        return Err(UsageError(
            "memory:// is for ebb's own tests: a repository there would vanish when ebb exits; \
             use file:///path or s3://bucket/prefix"
                .into(),
        )
        .into());
    }
    let store = Store::open(&url, true)?;
    // Refused before a password is asked for: a repository, or data, is there.
    Repository::init_plan(&store).await?;
    let secret = secret(g, true)?;
    let (repo, created) = Repository::init(store, &secret, catalog::DEFAULT_KDF, host()).await?;
    match created {
        catalog::Created::New => eprintln!("created ebb repository {} at {url}", repo.id().short()),
        catalog::Created::Finished => {
            eprintln!("finished the interrupted creation of ebb repository {} at {url}", repo.id().short())
        }
    }
    eprintln!("keep the password safe: without it the data cannot be read, by you or anyone");
    Ok(ExitCode::SUCCESS)
}

async fn key(g: &Global, cmd: KeyCommand) -> Result<ExitCode> {
    let repo = open(g).await?;
    match cmd {
        KeyCommand::List { json } => {
            let (slots, problems) = repo.key_slots().await?;
            if json {
                let v: Vec<_> = slots
                    .iter()
                    .map(|s| json!({"id": s.slot, "kind": s.kind, "created": s.created, "host": s.host, "current": s.slot == repo.slot()}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = slots
                    .iter()
                    .map(|s| {
                        let kind = match s.kind {
                            catalog::SlotKind::Password => "password",
                            catalog::SlotKind::Keyfile => "key file",
                        };
                        let mark = if s.slot == repo.slot() { "*" } else { "" };
                        vec![format!("{mark}{}", s.slot), kind.into(), s.created.clone(), s.host.clone()]
                    })
                    .collect();
                table(&["ID", "KIND", "CREATED", "HOST"], &rows);
            }
            for p in problems {
                eprintln!("warning: {p}");
            }
        }
        KeyCommand::Add { new_password_file, new_key_file } => {
            let slot = if let Some(path) = new_key_file {
                repo.add_key_file(&path, catalog::DEFAULT_KDF, host()).await?
            } else {
                let pw = new_password(new_password_file.as_deref())?;
                repo.add_slot(Secret::Password(pw), catalog::DEFAULT_KDF, host()).await?
            };
            println!("added key slot {}", slot.slot);
        }
        KeyCommand::Remove { slot } => {
            repo.remove_slot(&slot).await?;
            println!("removed key slot {slot}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The exit status of a backup that saved its point without some entries.
pub const EXIT_SKIPPED: u8 = 3;

async fn backup(
    g: &Global,
    source: Option<String>,
    exclude: Vec<String>,
    json: bool,
    allow_skipped: bool,
    path: std::path::PathBuf,
) -> Result<ExitCode> {
    let source = source_or_host(source)?;
    if let Err(e) = std::fs::symlink_metadata(&path) {
        return Err(UsageError(format!("cannot back up {}: {e}", path.display())).into());
    }
    let excludes = walk_excludes(g, &exclude, &path, &[])?;
    let repo = open(g).await?;
    let counters = Arc::new(streamer::Counters::default());
    let opts = streamer::SnapshotOptions {
        source: source.clone(),
        path,
        host: host(),
        workers: file_workers(),
        excludes,
        appends: Default::default(),
        tails: None,
    };
    let pb = spinner(g.quiet);
    let ticker = {
        let pb = pb.clone();
        let c = counters.clone();
        tokio::spawn(async move {
            loop {
                pb.set_message(format!(
                    "{} files, {} scanned, {} read",
                    c.files.load(Ordering::Relaxed),
                    bytes(c.bytes.load(Ordering::Relaxed)),
                    bytes(c.bytes_read.load(Ordering::Relaxed))
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let result = streamer::snapshot(&repo, &opts, counters).await;
    ticker.abort();
    pb.finish_and_clear();
    let (point, m) = result.map_err(|e| {
        let full = e.is_no_space();
        let e = anyhow::Error::from(e);
        if full {
            e.context(
                "the repository's filesystem is full: free space there and run the backup again; no point was saved",
            )
        } else {
            e
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&point_json(&point, Some(&m)))?);
    } else {
        let s = &m.stats;
        println!(
            "point {} of source {} saved: {} files, {} dirs, {} in all, {} read, {} added in {:.1} s",
            point.time,
            point.source,
            s.files,
            s.dirs,
            bytes(s.bytes),
            bytes(s.bytes_read),
            bytes(s.new_bytes),
            s.duration_ms as f64 / 1000.0
        );
    }
    if !m.skipped.is_empty() {
        eprintln!("warning: {} entries could not be read and are not in this point:", m.skipped.len());
        for s in m.skipped.iter().take(20) {
            eprintln!("  {}: {}", s.path, s.error);
        }
        if m.skipped.len() > 20 {
            eprintln!("  … and {} more (see `ebb points --json`)", m.skipped.len() - 20);
        }
        if !allow_skipped {
            return Ok(ExitCode::from(EXIT_SKIPPED));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn point_json(p: &PointRef, m: Option<&Manifest>) -> serde_json::Value {
    let mut v = json!({
        "source": p.source,
        "time": p.time.to_string(),
        "id": p.short_id(),
        "name": p.name,
    });
    if let Some(m) = m {
        v["host"] = json!(m.host);
        v["kind"] = json!(m.kind);
        v["path"] = json!(m.path);
        v["stats"] = serde_json::to_value(&m.stats).expect("stats serialize");
        v["skipped"] = serde_json::to_value(&m.skipped).expect("skipped serializes");
        if let Some(pg) = &m.pg {
            v["pg"] = serde_json::to_value(pg).expect("pg info serializes");
        }
    }
    v
}

async fn sources(g: &Global, json: bool) -> Result<ExitCode> {
    let repo = open(g).await?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let now = Timestamp::now();
    for source in repo.sources().await? {
        let points = repo.points(&source).await?;
        let Some(first) = points.first() else { continue };
        // The newest point that can be read, at or before now: a damaged or garbage
        // object is not taken for the source's state.
        let newest = repo.readable_point_at(&source, now).await?;
        for (p, why) in newest.iter().flat_map(|r| &r.damaged) {
            eprintln!("warning: point {} of {source} cannot be read: {why}", p.time);
        }
        let newest = newest.map(|r| r.point.time);
        // A PostgreSQL source is as recent as its newest WAL, not its last base backup.
        let wal = match streamer::pg::restore::wal_newest(&repo, &source).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("warning: the newest WAL of {source} cannot be read: {e}");
                None
            }
        };
        let durable = newest.max(wal);
        let lag = durable.map(|t| now.duration_since(t).as_secs_f64());
        out.push(json!({
            "source": source,
            "points": points.len(),
            "oldest": first.time.to_string(),
            "newest": newest.map(|t| t.to_string()),
            "wal_newest": wal.map(|t| t.to_string()),
            "lag_seconds": lag,
        }));
        rows.push(vec![
            source.clone(),
            points.len().to_string(),
            first.time.to_string(),
            newest.map_or("-".into(), |t| t.to_string()),
            lag.map_or("-".into(), |l| format!("{l:.0} s")),
        ]);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if rows.is_empty() {
        println!("no sources yet: make a point with `ebb backup PATH`");
    } else {
        table(&["SOURCE", "POINTS", "OLDEST", "NEWEST", "LAG"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

async fn points(
    g: &Global,
    source: Option<String>,
    since: Option<TimeSpec>,
    until: Option<TimeSpec>,
    json: bool,
) -> Result<ExitCode> {
    let span = catalog::Span::new(since, until, Timestamp::now())
        .map_err(|e| UsageError(format!("--since {} is after --until {}: no point can be both", e.since, e.until)))?;
    let repo = open(g).await?;
    let selected = repo.timeline().points_within(source.as_deref(), span).await?;
    // One manifest that cannot be read (damaged, foreign, gone) is listed as such;
    // the others are listed.
    let mut manifests = Vec::with_capacity(selected.len());
    for (p, r) in selected.iter().zip(repo.manifests_of(&selected).await?) {
        manifests.push(r.map_err(|e| {
            eprintln!("warning: point {} of {} cannot be read: {e}", p.time, p.source);
            e.to_string()
        }));
    }
    if json {
        let v: Vec<_> = selected
            .iter()
            .zip(&manifests)
            .map(|(p, m)| match m {
                Ok(m) => point_json(p, Some(m)),
                Err(e) => {
                    let mut v = point_json(p, None);
                    v["damaged"] = json!(e);
                    v
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(listed(&manifests));
    }
    let rows: Vec<Vec<String>> = selected
        .iter()
        .zip(&manifests)
        .map(|(p, m)| {
            let Ok(m) = m else {
                let dash = || "-".to_string();
                return vec![
                    p.time.to_string(),
                    p.source.clone(),
                    p.short_id().to_string(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    "DAMAGED: cannot be read (`ebb verify` says more)".into(),
                ];
            };
            let mut note = String::new();
            if !m.skipped.is_empty() {
                note = format!("{} skipped", m.skipped.len());
            }
            if let Some(pg) = &m.pg {
                note = format!("base backup, timeline {}, WAL {}..{}", pg.timeline, pg.start_lsn, pg.stop_lsn);
            }
            vec![
                p.time.to_string(),
                p.source.clone(),
                p.short_id().to_string(),
                m.stats.files.to_string(),
                bytes(m.stats.bytes),
                bytes(m.stats.new_bytes),
                m.path.clone(),
                note,
            ]
        })
        .collect();
    table(&["TIME", "SOURCE", "ID", "FILES", "SIZE", "ADDED", "PATH", "NOTE"], &rows);
    pg_ranges(&repo, &selected, &manifests).await?;
    Ok(listed(&manifests))
}

/// Like `ls` and `find`: everything that could be read is listed, and the exit code
/// says whether something could not be (a damaged or swapped manifest is a reason
/// to look, even for a script that only reads the list).
fn listed(manifests: &[Result<Manifest, String>]) -> ExitCode {
    if manifests.iter().any(|m| m.is_err()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// For each PostgreSQL source listed: the times it can be restored to, and any gap.
async fn pg_ranges(repo: &Repository, points: &[PointRef], manifests: &[Result<Manifest, String>]) -> Result<()> {
    let mut backups: std::collections::BTreeMap<&str, Vec<(Timestamp, catalog::wal::Lsn)>> = Default::default();
    for (p, m) in points.iter().zip(manifests) {
        let Ok(m) = m else { continue };
        if let Some(lsn) = m.pg.as_ref().and_then(|pg| pg.start_lsn.parse().ok()) {
            backups.entry(&p.source).or_default().push((p.time, lsn));
        }
    }
    for (source, b) in backups {
        let r = streamer::pg::restore::restorable(repo, source, &b).await?;
        let show = |t: Option<Timestamp>| t.map_or("-".to_string(), |t| t.to_string());
        println!(
            "{source}: restorable from {} to {} (timeline {}, WAL to {})",
            show(r.from),
            show(r.to),
            r.timeline,
            r.wal_end.as_deref().unwrap_or("-")
        );
        for g in &r.gaps {
            println!(
                "{source}: GAP in the WAL of timeline {} from {} to {} (WAL resumes from {}): restoring past it needs \
                 a base backup taken after it",
                g.timeline,
                g.from,
                g.to,
                show(g.until)
            );
        }
    }
    Ok(())
}

/// The source a reading command works on: the one given, or the only one there is.
async fn pick_source(repo: &Repository, source: Option<String>) -> Result<String> {
    repo.timeline().pick_source(source).await.map_err(|e| match e {
        e @ RepoError::SeveralSources { .. } => UsageError(e.to_string()).into(),
        e => e.into(),
    })
}

async fn restore(
    g: &Global,
    at: TimeSpec,
    source: Option<String>,
    path: Option<std::path::PathBuf>,
    target: std::path::PathBuf,
) -> Result<ExitCode> {
    if let Some(p) = &path {
        if p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(UsageError(format!("--path {} must not contain '..'", p.display())).into());
        }
    }
    let repo = open(g).await?;
    let source = pick_source(&repo, source).await?;
    let now = Timestamp::now();
    let named = repo.resolve(&source, at, now).await?;
    // A point that cannot be read is passed over for the one before it, with a warning.
    let catalog::Readable { point, manifest, damaged } =
        repo.readable_point_at(&source, named.time).await?.ok_or_else(|| {
            anyhow::anyhow!(
                "no point of source {source} at or before {} can be read (`ebb verify` says what is damaged)",
                at.instant(now)
            )
        })?;
    for (p, why) in &damaged {
        eprintln!("warning: point {} cannot be read ({why}); restoring the one before it, {}", p.time, point.time);
    }
    let overlay = repo.overlay(&point, at.instant(now)).await?;
    let appends =
        if overlay.is_empty() { String::new() } else { format!(" with the appends until {}", at.instant(now)) };
    eprintln!("restoring point {} of source {} ({}){appends}", point.time, point.source, manifest.path);
    let opts = catalog::RestoreOptions {
        path: path.map(|p| p.as_os_str().as_bytes().to_vec()),
        target: target.clone(),
        overlay,
    };
    let pb = spinner(g.quiet);
    pb.set_message(format!("restoring into {}", target.display()));
    let report = catalog::restore(&repo, &manifest, opts).await;
    pb.finish_and_clear();
    let report = report?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "restored {} files, {} dirs, {} other entries, {} into {}",
        report.files,
        report.dirs,
        report.others,
        bytes(report.bytes),
        target.display()
    );
    if !report.failed.is_empty() {
        eprintln!("error: {} entries could not be restored and were left out:", report.failed.len());
        for (p, why) in &report.failed {
            eprintln!("  {}: {why}", p.display());
        }
        if report.unreadable > 0 {
            eprintln!("run `ebb verify --read-data` to see what is damaged in the repository");
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn repair_config(g: &Global) -> Result<ExitCode> {
    let url = repo_url(g)?;
    let store = Store::open(&url, false)?;
    let secret = secret(g, false)?;
    let repo = Repository::repair_config(store, &secret).await?;
    println!("wrote the config of repository {} at {url} again, from key slot {}", repo.id().short(), repo.slot());
    Ok(ExitCode::SUCCESS)
}

async fn repair_index(g: &Global) -> Result<ExitCode> {
    let repo = open(g).await?;
    let pb = spinner(g.quiet);
    pb.set_message("reading the index and listing the packs");
    let r = catalog::repair_index(&repo).await;
    pb.finish_and_clear();
    let r = r?;
    println!(
        "index repaired: {} index files kept, {} rewritten, {} removed; {} entries of missing packs dropped; \
         {} packs indexed from their headers",
        r.kept, r.rewritten, r.removed, r.dropped_entries, r.indexed_packs
    );
    if r.dropped_entries > 0 {
        println!(
            "new backups store the content of the missing packs again; points that used it stay damaged \
             (`ebb verify` names them)"
        );
    }
    for p in &r.unreadable_packs {
        eprintln!("warning: pack header unreadable, so its pack stays unindexed: {p}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(g: &Global, read_data: bool, json: bool) -> Result<ExitCode> {
    let repo = open(g).await?;
    let pb = spinner(g.quiet);
    let progress = {
        let pb = pb.clone();
        move |s: &str| pb.set_message(format!("checking {s}"))
    };
    let report = catalog::verify(&repo, read_data, &progress).await;
    pb.finish_and_clear();
    let r = report?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "points": r.points, "trees": r.trees, "data_blobs": r.data_blobs, "packs": r.packs,
                "packs_read": r.packs_read, "index_files": r.index_files, "fragments": r.fragments,
                "unreferenced_packs": r.unreferenced_packs,
                "packs_of_missing_points": r.packs_of_missing_points, "errors": r.errors,
            }))?
        );
    } else {
        println!(
            "checked {} points, {} fragments, {} trees, {} data blobs, {} index files, {} packs{}",
            r.points,
            r.fragments,
            r.trees,
            r.data_blobs,
            r.index_files,
            r.packs,
            if read_data { format!(" ({} read in full)", r.packs_read) } else { String::new() }
        );
        if r.unreferenced_packs > 0 {
            println!(
                "{} packs are referenced by no point or fragment (left by an interrupted backup; harmless)",
                r.unreferenced_packs
            );
        }
        for e in &r.errors {
            eprintln!("error: {e}");
        }
    }
    if r.errors.is_empty() {
        if !json {
            println!("no errors found");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("verify found {} problems", r.errors.len());
        Ok(ExitCode::from(1))
    }
}
