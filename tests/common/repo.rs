//! `TestRepo`: a fresh, unique repository on the `file://` or `s3://` backend, the
//! `ebb` binary as a `Command` with the environment that points it there, and raw
//! access to the stored objects (to search them for plaintext or to corrupt them).
//!
//! The S3 backend is the moto server on loopback that `scripts/test` starts and names
//! in `EBB_TEST_S3_ENDPOINT`. Requests to it here are plain HTTP/1.1 over a
//! `TcpStream` with a dummy (unverified) signature, which moto accepts, so the
//! harness needs no S3 client.

use std::env;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The password every test repository is made with (passed as `EBB_PASSWORD`).
pub const TEST_PASSWORD: &str = "correct horse battery staple, ebb tests";
/// The bucket all S3 test repositories live in, each under its own prefix.
pub const S3_BUCKET: &str = "ebb-test";
/// Where the S3 server is, e.g. `http://127.0.0.1:5599`; set by `scripts/test`.
pub const S3_ENDPOINT_ENV: &str = "EBB_TEST_S3_ENDPOINT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    File,
    S3,
}

/// Both backends, for tests that loop over them.
pub fn backends() -> [Backend; 2] {
    [Backend::File, Backend::S3]
}

/// An S3-compatible server reachable over plain HTTP.
#[derive(Debug, Clone)]
pub struct S3Endpoint {
    /// As given to the binary in `AWS_ENDPOINT_URL`, e.g. `http://127.0.0.1:5599`.
    pub url: String,
    /// `host:port` to connect to and to send as `Host`.
    pub host_port: String,
}

impl S3Endpoint {
    /// From `EBB_TEST_S3_ENDPOINT`; panics with what to do when it is not set.
    pub fn from_env() -> S3Endpoint {
        let raw = env::var(S3_ENDPOINT_ENV).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| {
            panic!(
                "{S3_ENDPOINT_ENV} is not set, so the s3:// backend cannot be tested: \
                 run scripts/test, which starts the S3 server, or set {S3_ENDPOINT_ENV} \
                 (e.g. http://127.0.0.1:5599 for `moto_server -H 127.0.0.1 -p 5599`)"
            )
        });
        S3Endpoint::parse(raw.trim())
    }

    pub fn parse(raw: &str) -> S3Endpoint {
        let url = if raw.contains("://") { raw.to_string() } else { format!("http://{raw}") };
        let url = url.trim_end_matches('/').to_string();
        let rest = url.strip_prefix("http://").unwrap_or_else(|| {
            panic!("{S3_ENDPOINT_ENV}={raw}: only plain http:// endpoints are supported by the test harness")
        });
        let authority = rest.split('/').next().unwrap_or(rest);
        let host_port = if authority.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        S3Endpoint { url, host_port }
    }
}

enum Location {
    File { _tmp: Option<tempfile::TempDir>, dir: PathBuf },
    S3 { endpoint: S3Endpoint, prefix: String },
}

/// A fresh repository location, unique to this test (not initialised: run `init`).
pub struct TestRepo {
    pub backend: Backend,
    url: String,
    location: Location,
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
                TestRepo { backend, url, location: Location::File { _tmp: Some(tmp), dir } }
            }
            Backend::S3 => {
                let endpoint = S3Endpoint::from_env();
                ensure_bucket(&endpoint);
                let prefix = unique_name();
                let url = format!("s3://{S3_BUCKET}/{prefix}");
                TestRepo { backend, url, location: Location::S3 { endpoint, prefix } }
            }
        }
    }

    /// A `file://` repository in `dir` (which the caller owns and cleans up).
    pub fn at_dir(dir: &Path) -> TestRepo {
        let url = format!("file://{}", dir.display());
        TestRepo { backend: Backend::File, url, location: Location::File { _tmp: None, dir: dir.to_path_buf() } }
    }

    /// An `s3://` repository on the S3 server at `endpoint` (not the shared one).
    pub fn new_s3_at(endpoint: &str) -> TestRepo {
        let endpoint = S3Endpoint::parse(endpoint);
        ensure_bucket(&endpoint);
        let prefix = unique_name();
        let url = format!("s3://{S3_BUCKET}/{prefix}");
        TestRepo { backend: Backend::S3, url, location: Location::S3 { endpoint, prefix } }
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
                let p = dir.join(key);
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
                let p = dir.join(key);
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
                let p = dir.join(key);
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
            let key = rel.to_str().unwrap_or_else(|| panic!("object name is not UTF-8: {}", rel.display())).to_string();
            out.push(key);
        }
    }
}

// ---------------------------------------------------------------------------------
// Raw HTTP/1.1 against the S3 test server.

/// Creates `S3_BUCKET` once per process (200, or 409 when it already exists).
/// Creates the test bucket once per S3 server (tests may start servers of their own).
fn ensure_bucket(endpoint: &S3Endpoint) {
    static DONE: std::sync::Mutex<Vec<(String, Result<(), String>)>> = std::sync::Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = done.iter().find(|(url, _)| *url == endpoint.url) {
        if let Err(e) = r {
            panic!("{e}");
        }
        return;
    }
    let r = (|| {
        let r = http_request(endpoint, "PUT", &format!("/{S3_BUCKET}"), b"").map_err(|e| {
            format!(
                "cannot reach the S3 server at {} ({S3_ENDPOINT_ENV}): {e}; run scripts/test, \
                 which starts the S3 server, or start one and set {S3_ENDPOINT_ENV}",
                endpoint.url
            )
        })?;
        let body = String::from_utf8_lossy(&r.body);
        match r.status {
            200 => Ok(()),
            409 if body.contains("BucketAlreadyOwnedByYou") || body.contains("BucketAlreadyExists") => Ok(()),
            s => Err(format!("creating bucket {S3_BUCKET} at {}: HTTP {s}: {body}", endpoint.url)),
        }
    })();
    done.push((endpoint.url.clone(), r.clone()));
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn s3_request(endpoint: &S3Endpoint, method: &str, target: &str, body: &[u8]) -> HttpResponse {
    http_request(endpoint, method, target, body)
        .unwrap_or_else(|e| panic!("{method} {target} to the S3 server at {}: {e}", endpoint.url))
}

/// One request on a fresh connection (`Connection: close`); reads the whole response,
/// framed by Content-Length, chunked transfer encoding, or the end of the stream.
pub fn http_request(endpoint: &S3Endpoint, method: &str, target: &str, body: &[u8]) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(&endpoint.host_port)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.set_write_timeout(Some(Duration::from_secs(120)))?;
    // moto does not verify signatures (unless its IAM emulation is switched on), but
    // it refuses anonymous GETs of objects that are not public-read, and it calls a
    // request anonymous when it has no Authorization header: send a well-formed one.
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ebb-tests\r\nAccept: */*\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature={}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        endpoint.host_port,
        "0".repeat(64),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    read_response(BufReader::new(stream), method == "HEAD")
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| bad("non-UTF-8 line in HTTP head"))
}

fn read_response(mut r: impl BufRead, head_only: bool) -> io::Result<HttpResponse> {
    let (status, headers) = loop {
        let status_line = read_line(&mut r)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(bad(format!("bad status line {status_line:?}")));
        }
        let status: u16 =
            parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut r)?;
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        if (100..200).contains(&status) {
            continue; // 100 Continue and friends: the real response follows
        }
        break (status, headers);
    };
    let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let mut body = Vec::new();
    if head_only || status == 204 || status == 304 {
        // no body
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let line = read_line(&mut r)?;
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                // Trailers, up to an empty line (or the end of the stream).
                while let Ok(l) = read_line(&mut r) {
                    if l.is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            if !read_line(&mut r)?.is_empty() {
                return Err(bad("chunk not followed by CRLF"));
            }
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(HttpResponse { status, headers, body })
}

/// Percent-encodes all but RFC 3986 unreserved characters (and `/` if `keep_slash`).
pub fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn object_path(prefix: &str, key: &str) -> String {
    format!("/{S3_BUCKET}/{}", percent_encode(&format!("{prefix}/{key}"), true))
}

/// All keys under `prefix` (ListObjectsV2, following continuation tokens).
pub fn s3_list(endpoint: &S3Endpoint, prefix: &str, max_keys: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut target =
            format!("/{S3_BUCKET}?list-type=2&prefix={}&max-keys={max_keys}", percent_encode(prefix, false));
        if let Some(t) = &token {
            target.push_str(&format!("&continuation-token={}", percent_encode(t, false)));
        }
        let r = s3_request(endpoint, "GET", &target, b"");
        let xml = String::from_utf8_lossy(&r.body);
        if r.status != 200 {
            panic!("listing {S3_BUCKET}/{prefix} at {}: HTTP {}: {xml}", endpoint.url, r.status);
        }
        keys.extend(xml_elements(&xml, "Key"));
        if !xml.contains("<IsTruncated>true</IsTruncated>") {
            return keys;
        }
        let next = xml_elements(&xml, "NextContinuationToken").into_iter().next().unwrap_or_else(|| {
            panic!("listing {S3_BUCKET}/{prefix}: truncated result without NextContinuationToken: {xml}")
        });
        if token.as_deref() == Some(next.as_str()) {
            panic!("listing {S3_BUCKET}/{prefix}: continuation token did not advance: {next}");
        }
        token = Some(next);
    }
}

/// The unescaped text of every `<tag>...</tag>` in `xml`.
fn xml_elements(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(xml_unescape(&after[..j]));
        rest = &after[j + close.len()..];
    }
    out
}

fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let Some(end) = after.find(';') else {
            out.push_str(after);
            return out;
        };
        let entity = &after[1..end];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") || e.starts_with("#X") => {
                u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32)
            }
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}
