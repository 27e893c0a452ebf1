//! The S3 test server (moto on loopback, started by `scripts/test` and named in
//! `EBB_TEST_S3_ENDPOINT`), spoken to in plain HTTP/1.1 over a `TcpStream` with a
//! dummy (unverified) signature, which moto accepts, so that a harness needs no S3
//! client. Shared by the tests of the `ebb` binary and catalog's store conformance
//! suite (which includes this file by path).
#![allow(dead_code)]

use std::env;
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The bucket all S3 test repositories live in, each under its own prefix.
pub const S3_BUCKET: &str = "ebb-test";
/// Where the S3 server is, e.g. `http://127.0.0.1:5599`; set by `scripts/test`.
pub const S3_ENDPOINT_ENV: &str = "EBB_TEST_S3_ENDPOINT";

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

// ---------------------------------------------------------------------------------
// Raw HTTP/1.1 against the S3 test server.

/// Creates `S3_BUCKET` once per process (200, or 409 when it already exists).
/// Creates the test bucket once per S3 server (tests may start servers of their own).
pub fn ensure_bucket(endpoint: &S3Endpoint) {
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

pub fn s3_request(endpoint: &S3Endpoint, method: &str, target: &str, body: &[u8]) -> HttpResponse {
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

pub fn object_path(prefix: &str, key: &str) -> String {
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
