//! The command line: flags parsed into validated values. No repository logic here.

use std::path::PathBuf;

use catalog::time::{parse_time, TimeSpec};
use clap::{Args, Parser, Subcommand};

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
    /// Store one recovery point of a file or directory tree
    Backup {
        /// Source name: the timeline this point belongs to [default: the host name]
        #[arg(long, value_parser = parse_source)]
        source: Option<String>,
        /// Print the new point as JSON
        #[arg(long)]
        json: bool,
        path: PathBuf,
    },
    /// List sources with their newest point
    Sources {
        #[arg(long)]
        json: bool,
    },
    /// List recovery points
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
    /// Restore the state at a moment into a new or empty directory
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
        target: PathBuf,
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

fn parse_time_arg(s: &str) -> Result<TimeSpec, String> {
    let tz = jiff::tz::TimeZone::system();
    parse_time(s, jiff::Timestamp::now(), &tz).map_err(|e| e.to_string())
}

fn parse_source(s: &str) -> Result<String, String> {
    catalog::validate_source(s).map(|()| s.to_string())
}
