//! `TestRepo`: a fresh, unique repository on the `file://` or `s3://` backend, the
//! `ebb` binary as a `Command` with the environment that points it there, and raw
//! access to the stored objects (to search them for plaintext or to corrupt them).
//!
//! The S3 backend is the moto server on loopback that `scripts/test` starts (see
//! [`super::s3`]).

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The password every test repository is made with (passed as `EBB_PASSWORD`).
pub const TEST_PASSWORD: &str = "correct horse battery staple, ebb tests";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    File,
    S3,
}

/// Both backends, for tests that loop over them.
pub fn backends() -> [Backend; 2] {
    [Backend::File, Backend::S3]
}

use super::s3::{ensure_bucket, object_path, s3_request};
pub use super::s3::{http_request, percent_encode, s3_list, HttpResponse, S3Endpoint, S3_BUCKET, S3_ENDPOINT_ENV};

enum Location {
    File { _tmp: Option<tempfile::TempDir>, dir: PathBuf },
    S3 { endpoint: S3Endpoint, prefix: String },
}

/// A fresh repository location, unique to this test (not initialised: run `init`).
pub struct TestRepo {
    pub backend: Backend,
    url: String,
    location: Location,
    /// More environment for every command (`with_env`).
    env: Vec<(String, String)>,
}

/// `cmd` run under strace with `options` (e.g. `--inject=linkat:signal=KILL:when=1`
/// and `-P PATH`): a real signal or delay at an exact system call. Following forks,
/// quiet, with `cmd`'s environment.
pub fn under_strace(cmd: &Command, options: &[&str]) -> Command {
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-o", "/dev/null"]).args(options).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// The `ebb` binary under test: this build's, or `EBB_TEST_EXE` (to check that a
/// regression test fails against another build).
pub fn ebb_exe() -> PathBuf {
    env::var_os("EBB_TEST_EXE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ebb")))
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

fn unique_name() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("t{}-{}-{:x}", std::process::id(), UNIQUE.fetch_add(1, Ordering::SeqCst), nanos)
}

impl TestRepo {
    pub fn new(backend: Backend) -> TestRepo {
        match backend {
            Backend::File => {
                let tmp = tempfile::Builder::new()
                    .prefix("ebb-repo-")
                    .tempdir()
                    .expect("creating a temp dir for a file:// repo");
                let dir = tmp.path().join("repo");
                let url = format!("file://{}", dir.display());
                TestRepo { backend, url, location: Location::File { _tmp: Some(tmp), dir }, env: Vec::new() }
            }
            Backend::S3 => {
                let endpoint = S3Endpoint::from_env();
                ensure_bucket(&endpoint);
                let prefix = unique_name();
                let url = format!("s3://{S3_BUCKET}/{prefix}");
                TestRepo { backend, url, location: Location::S3 { endpoint, prefix }, env: Vec::new() }
            }
        }
    }

    /// A `file://` repository in `dir` (which the caller owns and cleans up).
    pub fn at_dir(dir: &Path) -> TestRepo {
        let url = format!("file://{}", dir.display());
        TestRepo {
            backend: Backend::File,
            url,
            location: Location::File { _tmp: None, dir: dir.to_path_buf() },
            env: Vec::new(),
        }
    }

    /// An `s3://` repository on the S3 server at `endpoint` (not the shared one).
    pub fn new_s3_at(endpoint: &str) -> TestRepo {
        let endpoint = S3Endpoint::parse(endpoint);
        ensure_bucket(&endpoint);
        let prefix = unique_name();
        let url = format!("s3://{S3_BUCKET}/{prefix}");
        TestRepo { backend: Backend::S3, url, location: Location::S3 { endpoint, prefix }, env: Vec::new() }
    }

    /// The repository URL given to the binary as `EBB_REPOSITORY`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The repository directory of a `file://` repo (it may not exist before `init`).
    pub fn repo_dir(&self) -> Option<&Path> {
        match &self.location {
            Location::File { dir, .. } => Some(dir),
            Location::S3 { .. } => None,
        }
    }

    /// The key prefix (no trailing slash) of an `s3://` repo in `S3_BUCKET`.
    pub fn s3_prefix(&self) -> Option<&str> {
        match &self.location {
            Location::File { .. } => None,
            Location::S3 { prefix, .. } => Some(prefix),
        }
    }

    pub fn s3_endpoint(&self) -> Option<&S3Endpoint> {
        match &self.location {
            Location::File { .. } => None,
            Location::S3 { endpoint, .. } => Some(endpoint),
        }
    }

    /// The `ebb` binary with the environment for this repository: `EBB_REPOSITORY`,
    /// `EBB_PASSWORD` (and no `EBB_PASSWORD_FILE`), for S3 the `AWS_*` variables for
    /// the test server. `RUST_LOG` is inherited. Stdin is null (override if needed).
    pub fn cmd(&self) -> Command {
        self.cmd_at(&ebb_exe())
    }

    /// Every command run for this repository gets `key=value` in its environment
    /// (e.g. `EBB_GRACE`, which every process writing or pruning it must share, or
    /// other S3 credentials).
    pub fn with_env(mut self, key: &str, value: &str) -> TestRepo {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `cmd` for a copy of the binary at `exe`.
    pub fn cmd_at(&self, exe: &Path) -> Command {
        let mut c = Command::new(exe);
        c.env("EBB_REPOSITORY", &self.url)
            .env("EBB_PASSWORD", TEST_PASSWORD)
            .env_remove("EBB_PASSWORD_FILE")
            .env_remove("EBB_KEY_FILE")
            .env_remove("EBB_NEW_PASSWORD")
            .stdin(Stdio::null());
        if let Location::S3 { endpoint, .. } = &self.location {
            c.env("AWS_ENDPOINT_URL", &endpoint.url)
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env_remove("AWS_SESSION_TOKEN")
                .env_remove("AWS_PROFILE");
        }
        // Last: a test's own variables win (other credentials, for one).
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs `ebb ARGS` to completion and returns its output, whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut c = self.cmd();
        c.args(args);
        c.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", self.describe(args)))
    }

    /// Runs `ebb ARGS`, asserts exit code 0, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        check_exit(&self.describe(args), &out, 0);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ebb ARGS`, asserts exit code `code` (non-zero), returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        assert_ne!(code, 0, "TestRepo::fails expects a non-zero exit code; use ok() for success");
        let out = self.run(args);
        check_exit(&self.describe(args), &out, code);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `ebb init`, asserted to succeed.
    pub fn init(&self) -> String {
        self.ok(&["init"])
    }

    fn describe(&self, args: &[&str]) -> String {
        format!("`ebb {}` (repository {})", shell_words(args), self.url)
    }

    /// Every object key under the repository, relative to it, sorted.
    pub fn objects(&self) -> Vec<String> {
        match &self.location {
            Location::File { dir, .. } => {
                let mut out = Vec::new();
                if dir.exists() {
                    walk_files(dir, dir, &mut out);
                }
                out.sort();
                out
            }
            Location::S3 { .. } => self.list_s3(1000),
        }
    }

    /// Like `objects()` for S3, listing `max_keys` per request (to exercise paging).
    pub fn list_s3(&self, max_keys: usize) -> Vec<String> {
        let Location::S3 { endpoint, prefix } = &self.location else {
            panic!("list_s3 on a {:?} repository", self.backend)
        };
        let full = format!("{prefix}/");
        let mut keys: Vec<String> = s3_list(endpoint, &full, max_keys)
            .into_iter()
            .map(|k| k.strip_prefix(&full).map(str::to_string).unwrap_or(k))
            .collect();
        keys.sort();
        keys
    }

    /// The stored bytes of object `key` (relative to the repository). Panics if absent.
    pub fn read_object(&self, key: &str) -> Vec<u8> {
        match &self.location {
            Location::File { dir, .. } => {
                let p = dir.join(catalog::local_path(key).as_ref());
                fs::read(&p).unwrap_or_else(|e| panic!("reading object {key} ({}): {e}", p.display()))
            }
            Location::S3 { endpoint, prefix } => {
                let r = s3_request(endpoint, "GET", &object_path(prefix, key), b"");
                if r.status != 200 {
                    panic!("GET object {key} in {}: HTTP {}: {}", self.url, r.status, String::from_utf8_lossy(&r.body));
                }
                r.body
            }
        }
    }

    /// Overwrites (or creates) object `key` with `data`.
    pub fn write_object(&self, key: &str, data: &[u8]) {
        match &self.location {
            Location::File { dir, .. } => {
                let p = dir.join(catalog::local_path(key).as_ref());
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
                }
                fs::write(&p, data).unwrap_or_else(|e| panic!("writing object {key} ({}): {e}", p.display()));
            }
            Location::S3 { endpoint, prefix } => {
                let r = s3_request(endpoint, "PUT", &object_path(prefix, key), data);
                if r.status != 200 {
                    panic!("PUT object {key} in {}: HTTP {}: {}", self.url, r.status, String::from_utf8_lossy(&r.body));
                }
            }
        }
    }

    /// Deletes object `key` (no error if it is absent).
    pub fn delete_object(&self, key: &str) {
        match &self.location {
            Location::File { dir, .. } => {
                let p = dir.join(catalog::local_path(key).as_ref());
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => panic!("deleting object {key} ({}): {e}", p.display()),
                }
            }
            Location::S3 { endpoint, prefix } => {
                let r = s3_request(endpoint, "DELETE", &object_path(prefix, key), b"");
                if !matches!(r.status, 200 | 204 | 404) {
                    panic!(
                        "DELETE object {key} in {}: HTTP {}: {}",
                        self.url,
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
            }
        }
    }

    /// Keys of the objects whose stored bytes contain `needle`.
    pub fn objects_containing(&self, needle: &[u8]) -> Vec<String> {
        assert!(!needle.is_empty());
        self.objects().into_iter().filter(|k| self.read_object(k).windows(needle.len()).any(|w| w == needle)).collect()
    }
}

/// Asserts `out` exited with `code`, else panics with the command, stdout and stderr.
pub fn check_exit(what: &str, out: &Output, code: i32) {
    if out.status.code() != Some(code) {
        panic!(
            "{what} exited with {}, expected exit code {code}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b)) {
                a.to_string()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn walk_files(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        let path = entry.path();
        let ft = entry.file_type().unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        if ft.is_dir() {
            walk_files(base, &path, out);
        } else {
            let rel = path.strip_prefix(base).expect("walk stays under base");
            let path = rel.to_str().unwrap_or_else(|| panic!("object name is not UTF-8: {}", rel.display()));
            out.push(catalog::local_name(path).into_owned());
        }
    }
}
