//! The command line: flags parsed into validated values, and the usage error (exit
//! code 2) a command may still find after parsing. No repository logic here.

use std::path::PathBuf;

use catalog::time::{parse_time, TimeSpec};
use clap::{Args, Parser, Subcommand};

/// A mistake in how ebb was called (exit code 2), found after parsing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Parser, Debug)]
#[command(
    name = "ebb",
    version,
    about = "Ship a host's files to object storage, encrypted and deduplicated, and restore any moment",
    long_about = "Ship a host's files to object storage, encrypted (AES-256-GCM) and deduplicated, \
and restore or browse them as they were at any moment.\n\n\
The repository is --repo URL or EBB_REPOSITORY: file:///path, or s3://bucket/prefix (with the \
usual AWS_* variables; AWS_ENDPOINT_URL for S3-compatible servers). Without either, a default \
repository on the local disk is used. The password comes from EBB_PASSWORD, EBB_PASSWORD_FILE \
or --password-file, or a prompt on a terminal; a key file from --key-file or EBB_KEY_FILE."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Whether the command reads WAL segments one after another (16 MiB buffers
    /// each, freed as the next comes), rather than holding many large buffers at
    /// once as backups, restores and prunes do.
    pub fn churns_segments(&self) -> bool {
        matches!(&self.command, Command::Pg(PgCommand::Serve(_) | PgCommand::Dump(_) | PgCommand::ArchiveGet { .. }))
    }

    /// Whether this command is about to derive a key from a password, which is worth
    /// preparing for while it starts (`catalog::prepare_kdf_memory`).
    pub fn unlocks_with_password(&self) -> bool {
        if self.global.key_file.is_some() {
            return false;
        }
        match &self.command {
            // Neither opens the repository: status reads this host's stream states.
            Command::Umount { .. } | Command::Status { .. } => false,
            // Its key comes from `ebb mount`, which derived it.
            Command::Mount { handoff, .. } => !handoff,
            // Most calls answer from what the pusher noted, without unlocking.
            Command::Pg(PgCommand::ArchivePush { pusher, .. }) => *pusher,
            // Most calls take their segment from the spool, without unlocking.
            Command::Pg(PgCommand::ArchiveGet { prefetch, fetcher, .. }) => *prefetch == 0 || *fetcher,
            _ => true,
        }
    }
}

#[derive(Args, Debug)]
pub struct Global {
    /// Repository URL: file:///path or s3://bucket/prefix
    #[arg(long, global = true, env = "EBB_REPOSITORY", value_name = "URL")]
    pub repo: Option<String>,
    /// Read the password from this file (first line)
    #[arg(long, global = true, env = "EBB_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Unlock with this key file instead of a password
    #[arg(long, global = true, env = "EBB_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a repository
    Init,
    /// Manage the key slots that unlock the repository
    #[command(subcommand)]
    Key(KeyCommand),
    /// Store one recovery point of a file or directory tree. Exits 3 when the point
    /// was saved without some entries that could not be read (see --allow-skipped)
    Backup {
        /// Source name: the series of points this one belongs to [default: the host name]
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// Leave out matching paths: a name at any depth (*.tmp), or a path below PATH (cache/**)
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// Print the new point as JSON
        #[arg(long)]
        json: bool,
        /// Exit 0 even when some entries could not be read (they are left out of the
        /// point and listed); without it such a backup exits 3
        #[arg(long)]
        allow_skipped: bool,
        path: PathBuf,
    },
    /// List sources with their newest point
    Sources {
        #[arg(long)]
        json: bool,
    },
    /// List recovery points. Exits 1 when one of them cannot be read (it is listed,
    /// marked damaged)
    Points {
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// Only points at or after this time
        #[arg(long, value_parser = parse_time_arg, value_name = "T")]
        since: Option<TimeSpec>,
        /// Only points at or before this time
        #[arg(long, value_parser = parse_time_arg, value_name = "T")]
        until: Option<TimeSpec>,
        #[arg(long)]
        json: bool,
    },
    /// Restore the state at a moment into a new or empty directory, or over an existing tree
    #[command(long_about = "Restore the state at a moment into TARGET, a new or empty directory. \
With --overwrite, TARGET may hold an earlier copy (or an interrupted restore): files that already have \
the point's size, time and content are kept, the others are rewritten, and what the point does not \
have is removed, so running a restore again after an interruption fetches only what is missing. \
Files are written under temporary names and renamed into place once complete.")]
    Restore {
        /// The moment: RFC 3339, local "2026-11-21 10:15", @UNIX, "15m ago", or latest
        #[arg(long, value_parser = parse_time_arg, value_name = "T")]
        at: TimeSpec,
        /// Needed when the repository holds several sources
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// Restore only this file or directory of the point (relative to the backed-up
        /// directory); it lands as TARGET/<its name>
        #[arg(long, value_name = "P")]
        path: Option<PathBuf>,
        /// Restore over what TARGET holds, keeping the files that are already right
        /// and removing what the point does not have
        #[arg(long, visible_alias = "delta")]
        overwrite: bool,
        /// Memory the restore may use, e.g. 256MiB or 1GiB
        #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
        memory: u64,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
        target: PathBuf,
    },
    /// Mount the state at a moment (or every point) as a read-only filesystem
    #[command(long_about = "Mount the repository read-only. With --at T, MOUNTPOINT shows the state at T \
(under <source>/ when several sources are shown). Without it, MOUNTPOINT shows every point: \
<source>/latest, <source>/points/<time>/ and <source>/at/<any time form>/, and points that arrive \
while mounted appear within seconds. Data is fetched and decrypted only when read.")]
    Mount {
        /// The moment to show: RFC 3339, local "2026-11-21 10:15", @UNIX, "15m ago", or latest
        #[arg(long, value_parser = parse_time_arg, value_name = "T")]
        at: Option<TimeSpec>,
        /// Show only this source
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// Memory for decrypted chunks, e.g. 256MiB or 2GiB
        #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
        cache_size: u64,
        /// Also keep fetched chunks (still encrypted) in this directory, across mounts
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// The most the --cache-dir may hold
        #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size, requires = "cache_dir")]
        cache_dir_size: u64,
        /// Stay in the foreground (otherwise ebb mount returns once the mount is ready)
        #[arg(long)]
        foreground: bool,
        /// Started by `ebb mount`: the key comes on stdin, and "ready" goes out on stdout
        #[arg(long, hide = true, requires = "foreground")]
        handoff: bool,
        mountpoint: PathBuf,
    },
    /// Ship continuously, until SIGINT or SIGTERM
    #[command(subcommand)]
    Stream(StreamCommand),
    /// PostgreSQL: base backups, archive_command and restore_command, point-in-time restore
    #[command(subcommand)]
    Pg(PgCommand),
    /// For each source: its RPO, how far behind the repository is, the newest point and
    /// the last error. Exits 1 when a source is past its RPO.
    Status {
        /// Where streams keep their state [default: /var/lib/ebb/state as root, else ~/.local/state/ebb]
        #[arg(long, env = "EBB_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Unmount what `ebb mount` mounted (also clears a mount left by a killed daemon)
    Umount { mountpoint: PathBuf },
    /// Repair what can be rebuilt: the index (from the packs' own headers), a lost config (from the key slots)
    #[command(subcommand)]
    Repair(RepairCommand),
    /// Retention policies, stored in the repository: which points `ebb forget` keeps
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Apply each source's retention policy: remove the points it does not keep
    #[command(long_about = "Apply each source's retention policy (see `ebb policy`): list every point as \
kept, with the rules that keep it, or removed, and remove the removed ones. The newest point of a source \
is always kept, and a source without a policy keeps everything. Only the points go: the data they alone \
referenced stays until `ebb prune`, so a mount or restore reading one reads on.")]
    Forget {
        /// Only this source [default: every source]
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// Show what would be removed, and remove nothing
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete what no point needs, safely while others write
    #[command(long_about = "Delete what no point or fragment needs: packs of forgotten points, index \
files and records that only they needed, policies no longer in force, log fragments a later point holds, \
and the PostgreSQL WAL no kept base backup needs (the pieces of each finished WAL segment are merged into \
one object first). Packs still used but mostly unused (see --max-unused), and small packs when there are \
many, are repacked: their used blobs are written into new packs and the points using them are written \
again under their own names. Deletion takes two runs: a run \
condemns what nothing uses, and a run at least the grace period later (15 minutes) deletes it, unless a \
writer used it again meanwhile. Backups, streams and archive-push go on while prune runs, never wait for \
it, and need no permission to delete. Run it on a schedule, like forget.")]
    Prune {
        /// Show what would be condemned and deleted, and change nothing
        #[arg(long)]
        dry_run: bool,
        /// Unused space to leave in packs still in use, as a share of all pack space
        /// (e.g. 5%, 0%, unlimited); above it, the emptiest packs are repacked
        #[arg(long, value_name = "PCT", default_value = "5%", value_parser = catalog::MaxUnused::parse)]
        max_unused: catalog::MaxUnused,
        /// Memory prune may use, e.g. 256MiB or 1GiB: past a quarter of it, what it
        /// finds of the blobs points use goes to local disk (the cache directory)
        #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
        memory: u64,
        #[arg(long)]
        json: bool,
    },
    /// Check that every point can be read back
    Verify {
        /// Also download and authenticate every stored blob
        #[arg(long)]
        read_data: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct DirArgs {
    /// Source name: the series the points belong to [default: the host name]
    #[arg(long, value_parser = parse_source)]
    pub source: Option<String>,
    /// Recovery point objective: the most a change may wait to be durable (e.g. 30s, 1m, 15m)
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub rpo: std::time::Duration,
    /// Leave out matching paths: a name at any depth (*.tmp), or a path below PATH (cache/**)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Append-only files (logs): when one grew, only the new bytes are read and
    /// shipped, within --append-interval; a name at any depth or a path below PATH
    #[arg(long = "append", value_name = "GLOB", default_value = "*.log")]
    pub appends: Vec<String>,
    /// Bytes appended to an append-only file are shipped within this long, without a new point
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub append_interval: std::time::Duration,
    /// Walk the whole tree at least this often, even when no change was seen
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub rescan: std::time::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9184)
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where to keep the state `ebb status` reads [default: /var/lib/ebb/state as root, else ~/.local/state/ebb]
    #[arg(long, env = "EBB_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Also run `ebb forget --source SOURCE` and `ebb prune` this often (e.g. 1h), so
    /// that the host needs no cron job; needs permission to delete
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub prune_every: Option<std::time::Duration>,
    pub path: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// A directory tree: a new recovery point whenever something in it changed, so
    /// that no change waits longer than the RPO; bytes appended to logs (--append)
    /// are shipped within --append-interval
    Dir(DirArgs),
    /// PostgreSQL WAL, as a replica receives it: durable in the repository within
    /// --flush-interval, and confirmed to the server (the slot advances) only then
    Pg(PgStreamArgs),
}

#[derive(clap::Args, Debug)]
pub struct PgStreamArgs {
    /// Source name [default: the host name]
    #[arg(long, value_parser = parse_source)]
    pub source: Option<String>,
    /// The server: a libpq connection string or URL. Give the password through
    /// PGPASSWORD, or the whole DSN through EBB_PG_DSN, not on the command line
    #[arg(long, env = "EBB_PG_DSN", value_name = "DSN", hide_env_values = true)]
    pub dsn: String,
    /// Physical replication slot; created when missing [default: ebb_<source>]
    #[arg(long, value_name = "NAME", value_parser = parse_slot)]
    pub slot: Option<String>,
    /// Received WAL is durable in the repository within this long
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_flush_interval)]
    pub flush_interval: std::time::Duration,
    /// Also take a base backup this often (e.g. 1d), the first at start
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub base_backup_every: Option<std::time::Duration>,
    /// The lag past which `ebb status` and the metrics raise the alarm
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub rpo: std::time::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9184)
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where to keep the state `ebb status` reads [default: /var/lib/ebb/state as root, else ~/.local/state/ebb]
    #[arg(long, env = "EBB_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Also run `ebb forget --source SOURCE` and `ebb prune` this often (e.g. 1h), so
    /// that the host needs no cron job; needs permission to delete
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub prune_every: Option<std::time::Duration>,
}

#[derive(Subcommand, Debug)]
pub enum PgCommand {
    /// A base backup over the replication protocol, deduplicated against earlier ones
    BaseBackup {
        /// Source name [default: the host name]
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// The server: a libpq connection string or URL (password through PGPASSWORD or EBB_PG_DSN)
        #[arg(long, env = "EBB_PG_DSN", value_name = "DSN", hide_env_values = true)]
        dsn: String,
    },
    /// For archive_command: store a WAL file ('ebb pg archive-push --source NAME %p').
    /// Exits 0 only once it is durable
    ArchivePush {
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// Push the segments PostgreSQL has ready from a background process, N at a
        /// time; each call returns once its segment is durable (0: each call pushes
        /// its own segment)
        #[arg(long, value_name = "N", default_value_t = 4)]
        read_ahead: usize,
        /// Where pushed segments are noted [default: under the state directory]
        #[arg(long, env = "EBB_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Run as the background pusher (started by archive-push itself)
        #[arg(long, hide = true)]
        pusher: bool,
        path: PathBuf,
    },
    /// For restore_command: fetch a WAL file ('ebb pg archive-get --source NAME --prefetch 8
    /// %f %p'). Exits 1 when the repository does not have it, 126 when the store cannot be read
    ArchiveGet {
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// Fetch the N segments after the one asked for from a background process,
        /// into the spool, where the next calls take them (0: each call fetches its
        /// own segment). The spool holds at most N segments
        #[arg(long, value_name = "N", default_value_t = 0)]
        prefetch: usize,
        /// Where segments fetched ahead wait [default: ebb-spool beside DEST, in
        /// the server's pg_wal]
        #[arg(long, value_name = "DIR")]
        spool: Option<PathBuf>,
        /// Run as the background fetcher (started by archive-get itself)
        #[arg(long, hide = true)]
        fetcher: bool,
        /// Serve no WAL at or past this position (X/Y): what was stored after it is
        /// never replayed (`pg restore` and `pg serve` set it when every transaction
        /// in the stored WAL ended by their T)
        #[arg(long, value_name = "LSN", value_parser = parse_lsn)]
        until: Option<catalog::wal::Lsn>,
        walname: String,
        dest: PathBuf,
    },
    /// Write the newest base backup at or before T into DATADIR, configured so that
    /// PostgreSQL started on it recovers to exactly T
    Restore {
        /// The moment: RFC 3339, 'YYYY-MM-DD HH:MM[:SS]' (local), @UNIX, '15m ago', or latest
        #[arg(long, value_parser = parse_time_arg)]
        at: TimeSpec,
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// How many segments the restored server's restore_command fetches ahead
        /// of its calls (archive-get --prefetch)
        #[arg(long, value_name = "N", default_value_t = 8)]
        prefetch: usize,
        /// An empty or missing directory
        datadir: PathBuf,
    },
    /// Run PostgreSQL on the newest base backup at or before T, recovered to exactly
    /// T, without restoring it: read-only and paused at T, or with --writable a
    /// throwaway copy that takes writes. Stops on SIGINT or SIGTERM
    #[command(long_about = "Run PostgreSQL on the newest base backup at or before T, recovered to \
exactly T, without restoring it. The base backup's files are mounted as a branch: what the server \
reads is fetched from the repository a chunk at a time, what it writes stays on the local disk (under \
--scratch), and nothing is ever written to the repository. By default the server is a hot standby \
paused at T: every query sees exactly the state at T. With --writable it is promoted at T into a \
throwaway copy that takes writes. Once queries are answered at T, ebb prints how to connect, and runs \
until SIGINT or SIGTERM, which stop the server, unmount the branch and delete the scratch. Run as \
root, the server runs as the postgres user. The server's restore_command runs ebb as that user: give \
the secret as --key-file or --password-file, a file that user can read.")]
    Serve(Box<PgServeArgs>),
    /// Run pg_dump on the database as it was at T, without restoring it: serves T
    /// read-only (as serve does, on a private socket), runs pg_dump with the
    /// arguments after --, writes the dump to stdout, and stops
    #[command(after_help = "Example: one table as it was at 10:14, in pg_dump's custom format:\n  \
ebb pg dump --at '2026-11-21 10:14' --source db -- -t public.orders -Fc > orders.dump")]
    Dump(Box<PgDumpArgs>),
}

#[derive(clap::Args, Debug)]
pub struct PgDumpArgs {
    /// The moment: RFC 3339, 'YYYY-MM-DD HH:MM[:SS]' (local), @UNIX, '15m ago', or latest
    #[arg(long, value_parser = parse_time_arg)]
    pub at: TimeSpec,
    /// The source [default: the host name]
    #[arg(long, value_parser = parse_source)]
    pub source: Option<String>,
    /// Where the blocks the server writes, its socket and its log are kept while it
    /// runs: a new or empty directory, or an earlier run's [default: serve/SOURCE in
    /// ebb's cache directory; as root, /var/tmp/ebb-pg-serve/SOURCE]
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// How many WAL segments the server's restore_command fetches ahead of its calls
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub prefetch: usize,
    /// The server's shared_buffers (PostgreSQL's units: 1GB, 512MB)
    #[arg(long, value_name = "SIZE", default_value = "1GB")]
    pub shared_buffers: String,
    /// The role pg_dump connects as (through the server's private socket: no password)
    #[arg(long, value_name = "ROLE", default_value = "postgres")]
    pub user: String,
    /// The directory of PostgreSQL's programs [default: /usr/lib/postgresql/MAJOR/bin
    /// for the base backup's version, else the PATH]
    #[arg(long, env = "EBB_PG_BIN", value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// pg_dump's own arguments (after --): what to dump and how (-t TABLE, -Fc, -d DBNAME, ...)
    #[arg(last = true, value_name = "PG_DUMP_ARGS")]
    pub pg_dump_args: Vec<std::ffi::OsString>,
}

#[derive(clap::Args, Debug)]
pub struct PgServeArgs {
    /// The moment: RFC 3339, 'YYYY-MM-DD HH:MM[:SS]' (local), @UNIX, '15m ago', or latest
    #[arg(long, value_parser = parse_time_arg)]
    pub at: TimeSpec,
    /// The source [default: the host name]
    #[arg(long, value_parser = parse_source)]
    pub source: Option<String>,
    /// The server's port [default: the first free one from 5433]
    #[arg(long, value_name = "P")]
    pub port: Option<u16>,
    /// The addresses the server listens on (listen_addresses); '' for its socket only
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub listen: String,
    /// Where the blocks the server writes, its socket and its log are kept while it
    /// runs: a new or empty directory, or an earlier run's [default: serve/SOURCE in
    /// ebb's cache directory; as root, /var/tmp/ebb-pg-serve/SOURCE]
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// Promote the server at T into a copy that takes writes (thrown away when it stops)
    #[arg(long)]
    pub writable: bool,
    /// The server's shared_buffers: what recovery keeps in memory rather than writes
    /// through the branch and reads back (PostgreSQL's units: 1GB, 512MB)
    #[arg(long, value_name = "SIZE", default_value = "1GB")]
    pub shared_buffers: String,
    /// How many WAL segments the server's restore_command fetches ahead of its calls
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub prefetch: usize,
    /// The role ebb connects as, through the server's private socket, to see it reach T
    #[arg(long, value_name = "ROLE", default_value = "postgres")]
    pub user: String,
    /// The directory of PostgreSQL's programs [default: /usr/lib/postgresql/MAJOR/bin
    /// for the base backup's version, else the PATH]
    #[arg(long, env = "EBB_PG_BIN", value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Set a source's retention rules; the rules not named keep their value (--clear: start afresh)
    #[command(long_about = "Set a source's retention rules, which every host reading the repository \
applies (`ebb forget`). Calendar rules keep the newest point of each of the N most recent hours, days, \
ISO weeks, months or years that have a point, in the policy's time zone. Spans (7d, 36h, 1y6mo) count \
back from the source's newest point, so a source that stopped writing keeps its history. The newest \
point is always kept. Rules not named keep their value; 0 or none turns one off.")]
    Set(Box<PolicySetArgs>),
    /// Show the retention policy of each source
    Show {
        /// Only this source
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct PolicySetArgs {
    /// The source [default: the only one the repository holds]
    #[arg(long, value_parser = parse_source)]
    pub source: Option<String>,
    /// Keep the N newest points
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep every point this recent (e.g. 7d, 36h, 1y6mo; none)
    #[arg(long, value_name = "SPAN", value_parser = parse_span)]
    pub keep_within: Option<SpanArg>,
    /// Keep the newest point of each of the N most recent hours that have one
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest point of each of the N most recent days that have one
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the N most recent ISO weeks that have one
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the N most recent months that have one
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest point of each of the N most recent years that have one
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every moment of this span restorable: its points and the one before it
    /// (for PostgreSQL, the base backups and all the WAL it needs; e.g. 7d; none)
    #[arg(long, value_name = "SPAN", value_parser = parse_span)]
    pub pitr_within: Option<SpanArg>,
    /// Where days begin for the calendar rules: an IANA name (Europe/Paris, UTC)
    /// [default: the policy's, or this host's]
    #[arg(long, value_name = "ZONE")]
    pub time_zone: Option<String>,
    /// Start from no rules instead of the rules in force
    #[arg(long)]
    pub clear: bool,
}

/// A retention span, or `none` to turn the rule off.
#[derive(Debug, Clone, Copy)]
pub struct SpanArg(pub Option<jiff::Span>);

#[derive(Subcommand, Debug)]
pub enum RepairCommand {
    /// Make the index say what the packs hold: drop entries whose pack is missing,
    /// so that new backups store that content again, and index packs no index names
    Index,
    /// Write the repository's lost `config` again, from the key slot your password
    /// or key file opens
    Config,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List key slots
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a key slot: a new password (EBB_NEW_PASSWORD, --new-password-file, or a
    /// prompt), or a new key file
    Add {
        /// Read the new password from this file
        #[arg(long, value_name = "FILE", conflicts_with = "new_key_file")]
        new_password_file: Option<PathBuf>,
        /// Create a key file here (mode 0600) and add a slot for it
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
    },
    /// Remove a key slot (never the last one)
    Remove { slot: String },
}

fn parse_lsn(s: &str) -> Result<catalog::wal::Lsn, String> {
    streamer::pg::lsn::parse(s)
}

fn parse_time_arg(s: &str) -> Result<TimeSpec, String> {
    parse_time(s, jiff::Timestamp::now(), jiff::tz::TimeZone::system).map_err(|e| e.to_string())
}

/// Durations like `30s`, `1m`, `1h30m` or `2 hours`, at least one second.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {s:?}: use e.g. 30s, 1m or 1h30m");
    let d: jiff::SignedDuration = s.trim().parse().map_err(|_| bad())?;
    let d = std::time::Duration::try_from(d).map_err(|_| bad())?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("duration {s:?} is too short: at least 1s"));
    }
    Ok(d)
}

/// Spans like `7d`, `36h`, `2 weeks` or `1y6mo`, or `none`.
fn parse_span(s: &str) -> Result<SpanArg, String> {
    let t = s.trim();
    if t == "none" || t == "0" {
        return Ok(SpanArg(None));
    }
    let span: jiff::Span =
        t.parse().map_err(|_| format!("invalid span {s:?}: use e.g. 7d, 36h, 2w or 1y6mo, or none"))?;
    if !span.is_positive() {
        return Err(format!("span {s:?} must be positive"));
    }
    Ok(SpanArg(Some(span)))
}

/// Sizes like `512MiB`, `2GiB`, `1G`, `100M` or a number of bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: use e.g. 512MiB or 2GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size {s:?}: use e.g. 512MiB or 2GiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// The flush interval: 100 ms at least.
fn parse_flush_interval(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {s:?}: use e.g. 500ms, 1s or 5s");
    let d: jiff::SignedDuration = s.trim().parse().map_err(|_| bad())?;
    let d = std::time::Duration::try_from(d).map_err(|_| bad())?;
    if d < std::time::Duration::from_millis(100) {
        return Err(format!("flush interval {s:?} is too short: at least 100ms"));
    }
    Ok(d)
}

fn parse_slot(s: &str) -> Result<String, String> {
    streamer::pg::validate_slot(s).map(|()| s.to_string())
}

fn parse_source(s: &str) -> Result<String, String> {
    catalog::validate_source(s).map(|()| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unlocks(args: &[&str]) -> bool {
        Cli::try_parse_from([&["ebb"], args].concat()).expect("parses").unlocks_with_password()
    }

    #[test]
    fn only_commands_that_derive_a_key_prepare_for_it() {
        assert!(unlocks(&["points"]));
        assert!(unlocks(&["mount", "/mnt/x"]));
        assert!(unlocks(&["pg", "archive-get", "--source", "db", "000000010000000000000001", "/tmp/x"]));
        assert!(!unlocks(&["--key-file", "/k", "points"]));
        assert!(!unlocks(&["status"]));
        assert!(!unlocks(&["umount", "/mnt/x"]));
        assert!(!unlocks(&["mount", "--foreground", "--handoff", "/mnt/x"]));
        assert!(!unlocks(&["pg", "archive-push", "--source", "db", "pg_wal/000000010000000000000001"]));
    }
}
