//! A replication connection to PostgreSQL. Mainline tokio-postgres cannot open one,
//! so the frontend/backend protocol is spoken here with `postgres-protocol` over a
//! tokio socket: startup with `replication=true`, trust, password, md5 or
//! SCRAM-SHA-256 authentication, then the simple-query replication commands and the
//! COPY sub-protocols that carry WAL and base backups.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use catalog::wal::Lsn;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{self, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;

use super::lsn;

/// How long connecting may take unless the DSN says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid --dsn: {0}")]
    BadDsn(String),
    #[error("cannot connect to PostgreSQL at {target}: {cause}")]
    Connect { target: String, cause: io::Error },
    #[error("PostgreSQL: {message} (SQLSTATE {code}){}", hint.as_deref().map(|h| format!("; hint: {h}")).unwrap_or_default())]
    Server { code: String, message: String, hint: Option<String> },
    #[error("PostgreSQL asks for {0} authentication, which ebb does not support (use scram-sha-256, md5, password or trust)")]
    UnsupportedAuth(&'static str),
    #[error("PostgreSQL asks for a password and none was given: set PGPASSWORD, or password=... in EBB_PG_DSN")]
    NoPassword,
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[from] io::Error),
}

impl PgError {
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    fn protocol(what: impl Into<String>) -> PgError {
        PgError::Protocol(what.into())
    }
}

/// Parses a DSN in either form libpq accepts (`host=... user=...` or a URL).
pub fn parse_dsn(dsn: &str) -> Result<tokio_postgres::Config, PgError> {
    dsn.parse::<tokio_postgres::Config>().map_err(|e| PgError::BadDsn(e.to_string()))
}

/// The user libpq would connect as: the DSN's, else the operating system's.
pub fn dsn_user(cfg: &tokio_postgres::Config) -> String {
    cfg.get_user().map(str::to_string).unwrap_or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map_or("postgres".to_string(), |u| u.name)
    })
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// The first result of a query: its rows, each column as text or NULL.
pub type Rows = Vec<Vec<Option<String>>>;

pub struct ReplConn {
    io: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub server_version: String,
}

/// What a COPY stream yields.
pub enum CopyEvent {
    Data(Bytes),
    Done,
}

impl ReplConn {
    /// Opens a replication connection (`replication=true`) and authenticates.
    pub async fn connect(cfg: &tokio_postgres::Config) -> Result<ReplConn, PgError> {
        let timeout = cfg.get_connect_timeout().copied().unwrap_or(CONNECT_TIMEOUT);
        let mut hosts: Vec<Host> = cfg.get_hosts().to_vec();
        if hosts.is_empty() {
            hosts = vec![Host::Unix("/var/run/postgresql".into()), Host::Unix("/tmp".into())];
        }
        let mut last = None;
        for (i, host) in hosts.iter().enumerate() {
            let port = cfg.get_ports().get(i).or(cfg.get_ports().first()).copied().unwrap_or(5432);
            let (target, io): (String, io::Result<Box<dyn Socket>>) = match host {
                Host::Tcp(h) => {
                    let target = format!("{h}:{port}");
                    let r = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((h.as_str(), port))).await;
                    let r = r.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
                    (
                        target,
                        r.map(|s| {
                            let _ = s.set_nodelay(true);
                            Box::new(s) as Box<dyn Socket>
                        }),
                    )
                }
                Host::Unix(dir) => {
                    let path: PathBuf = dir.join(format!(".s.PGSQL.{port}"));
                    let r = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path)).await;
                    let r = r.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
                    (path.display().to_string(), r.map(|s| Box::new(s) as Box<dyn Socket>))
                }
            };
            match io {
                Ok(io) => {
                    let mut conn = ReplConn {
                        io,
                        rbuf: BytesMut::with_capacity(1 << 16),
                        wbuf: BytesMut::new(),
                        server_version: String::new(),
                    };
                    conn.startup(cfg).await?;
                    return Ok(conn);
                }
                Err(cause) => last = Some(PgError::Connect { target, cause }),
            }
        }
        Err(last.unwrap_or_else(|| PgError::BadDsn("no host to connect to".into())))
    }

    async fn startup(&mut self, cfg: &tokio_postgres::Config) -> Result<(), PgError> {
        let user = dsn_user(cfg);
        let mut params = vec![("user", user.as_str()), ("replication", "true")];
        params.push(("application_name", cfg.get_application_name().unwrap_or("ebb")));
        if let Some(db) = cfg.get_dbname() {
            params.push(("database", db));
        }
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;
        let password = cfg.get_password();
        loop {
            match self.recv().await? {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password.ok_or(PgError::NoPassword)?, &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = password.ok_or(PgError::NoPassword)?;
                    let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), pw, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(m) = mechanisms.next()? {
                        scram |= m == SCRAM_SHA_256;
                    }
                    if !scram {
                        return Err(PgError::UnsupportedAuth("SASL without SCRAM-SHA-256"));
                    }
                    self.scram(password.ok_or(PgError::NoPassword)?).await?;
                }
                Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                    return Err(PgError::UnsupportedAuth("GSSAPI"))
                }
                Message::AuthenticationSspi => return Err(PgError::UnsupportedAuth("SSPI")),
                Message::AuthenticationKerberosV5 => return Err(PgError::UnsupportedAuth("Kerberos V5")),
                Message::AuthenticationScmCredential => return Err(PgError::UnsupportedAuth("SCM credential")),
                Message::ErrorResponse(body) => return Err(server_error(body)),
                _ => return Err(PgError::protocol("unexpected message during authentication")),
            }
        }
        loop {
            match self.recv().await? {
                Message::ParameterStatus(p) => {
                    if p.name()? == "server_version" {
                        self.server_version = p.value()?.to_string();
                    }
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(server_error(body)),
                _ => return Err(PgError::protocol("unexpected message after authentication")),
            }
        }
    }

    async fn scram(&mut self, password: &[u8]) -> Result<(), PgError> {
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.wbuf)?;
        self.flush().await?;
        match self.recv().await? {
            Message::AuthenticationSaslContinue(body) => scram.update(body.data())?,
            Message::ErrorResponse(body) => return Err(server_error(body)),
            _ => return Err(PgError::protocol("unexpected message during SCRAM authentication")),
        }
        frontend::sasl_response(scram.message(), &mut self.wbuf)?;
        self.flush().await?;
        match self.recv().await? {
            Message::AuthenticationSaslFinal(body) => scram.finish(body.data())?,
            Message::ErrorResponse(body) => return Err(server_error(body)),
            _ => return Err(PgError::protocol("unexpected message during SCRAM authentication")),
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        self.io.write_all(&self.wbuf).await?;
        self.io.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    /// The next message; a CopyBothResponse here is a protocol error (only
    /// `start_replication` expects one, through `recv_raw`).
    async fn recv(&mut self) -> Result<Message, PgError> {
        match self.recv_raw().await? {
            Raw::Message(m) => Ok(m),
            Raw::CopyBoth => Err(PgError::protocol("unexpected CopyBothResponse")),
        }
    }

    async fn recv_raw(&mut self) -> Result<Raw, PgError> {
        loop {
            if let Some(h) = backend::Header::parse(&self.rbuf)? {
                let total = h.len() as usize + 1;
                if h.tag() == b'W' && self.rbuf.len() >= total {
                    self.rbuf.advance(total);
                    return Ok(Raw::CopyBoth);
                }
            }
            if let Some(m) = parse_message(&mut self.rbuf)? {
                return Ok(Raw::Message(m));
            }
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return Err(PgError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    /// Runs one command and returns the rows of its (last) result set.
    pub async fn query(&mut self, q: &str) -> Result<Rows, PgError> {
        frontend::query(q, &mut self.wbuf)?;
        self.flush().await?;
        self.finish_query().await
    }

    /// Reads to ReadyForQuery, collecting rows; the first error wins.
    async fn finish_query(&mut self) -> Result<Rows, PgError> {
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            match self.recv().await? {
                Message::RowDescription(_) => rows.clear(),
                Message::DataRow(body) => rows.push(data_row(&body)?),
                Message::ErrorResponse(body) => {
                    err.get_or_insert(server_error(body));
                }
                Message::ReadyForQuery(_) => return err.map_or(Ok(rows), Err),
                Message::NoticeResponse(body) => tracing::info!("PostgreSQL: {}", notice_text(body)),
                _ => {}
            }
        }
    }

    /// IDENTIFY_SYSTEM: the system identifier, current timeline and flush position.
    pub async fn identify_system(&mut self) -> Result<(u64, u32, Lsn), PgError> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or_else(|| PgError::protocol("IDENTIFY_SYSTEM returned no row"))?;
        let field =
            |i: usize| row.get(i).cloned().flatten().ok_or_else(|| PgError::protocol("IDENTIFY_SYSTEM: missing field"));
        let sysid = field(0)?.parse().map_err(|_| PgError::protocol("IDENTIFY_SYSTEM: bad systemid"))?;
        let tli = field(1)?.parse().map_err(|_| PgError::protocol("IDENTIFY_SYSTEM: bad timeline"))?;
        let pos = lsn::parse(&field(2)?).map_err(PgError::Protocol)?;
        Ok((sysid, tli, pos))
    }

    /// The server's WAL segment size (`SHOW wal_segment_size`), in bytes.
    pub async fn segment_size(&mut self) -> Result<u64, PgError> {
        let rows = self.query("SHOW wal_segment_size").await?;
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|s| super::parse_size(&s))
            .ok_or_else(|| PgError::protocol("SHOW wal_segment_size gave no size"))
    }

    /// TIMELINE_HISTORY: the history file of timeline `tli` (name, content).
    pub async fn timeline_history(&mut self, tli: u32) -> Result<(String, Vec<u8>), PgError> {
        let rows = self.query(&format!("TIMELINE_HISTORY {tli}")).await?;
        match rows.first().map(|r| (r.first().cloned().flatten(), r.get(1).cloned().flatten())) {
            Some((Some(name), Some(content))) => Ok((name, content.into_bytes())),
            _ => Err(PgError::protocol("TIMELINE_HISTORY returned no file")),
        }
    }

    /// READ_REPLICATION_SLOT: `None` when there is no such slot, else its restart
    /// position (`None` when it reserves no WAL: PostgreSQL invalidated it).
    pub async fn read_slot(&mut self, slot: &str) -> Result<Option<Option<Lsn>>, PgError> {
        let rows = self.query(&format!("READ_REPLICATION_SLOT {}", quote_ident(slot))).await?;
        let Some(row) = rows.first() else { return Ok(None) };
        if row.first().cloned().flatten().is_none() {
            return Ok(None);
        }
        let restart = row.get(1).cloned().flatten().map(|s| lsn::parse(&s)).transpose().map_err(PgError::Protocol)?;
        Ok(Some(restart))
    }

    /// CREATE_REPLICATION_SLOT ... PHYSICAL RESERVE_WAL.
    pub async fn create_slot(&mut self, slot: &str) -> Result<(), PgError> {
        self.query(&format!("CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL", quote_ident(slot))).await?;
        Ok(())
    }

    /// START_REPLICATION: from here on the connection carries WAL (`copy_recv`) and
    /// standby status updates (`send_status`).
    pub async fn start_replication(&mut self, slot: &str, from: Lsn, tli: u32) -> Result<(), PgError> {
        let q = format!("START_REPLICATION SLOT {} PHYSICAL {} TIMELINE {tli}", quote_ident(slot), lsn::text(from));
        frontend::query(&q, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            match self.recv_raw().await? {
                Raw::CopyBoth => return Ok(()),
                Raw::Message(Message::ErrorResponse(body)) => {
                    let e = server_error(body);
                    self.finish_query().await.ok();
                    return Err(e);
                }
                Raw::Message(Message::NoticeResponse(body)) => tracing::info!("PostgreSQL: {}", notice_text(body)),
                Raw::Message(_) => return Err(PgError::protocol("unexpected reply to START_REPLICATION")),
            }
        }
    }

    /// The next message of a COPY stream (WAL, or a base backup's archives).
    pub async fn copy_recv(&mut self) -> Result<CopyEvent, PgError> {
        loop {
            match self.recv().await? {
                Message::CopyData(body) => return Ok(CopyEvent::Data(body.into_bytes())),
                Message::CopyDone => return Ok(CopyEvent::Done),
                Message::ErrorResponse(body) => return Err(server_error(body)),
                Message::NoticeResponse(body) => tracing::info!("PostgreSQL: {}", notice_text(body)),
                Message::CopyOutResponse(_) => {}
                _ => return Err(PgError::protocol("unexpected message in a COPY stream")),
            }
        }
    }

    /// Reads what follows the end of a COPY stream up to ReadyForQuery.
    pub async fn copy_finish(&mut self) -> Result<Rows, PgError> {
        self.finish_query().await
    }

    /// Sends a standby status update: written, flushed (durable) and applied positions.
    pub async fn send_status(&mut self, write: Lsn, flush: Lsn, reply: bool) -> Result<(), PgError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.extend_from_slice(b"r");
        msg.extend_from_slice(&write.0.to_be_bytes());
        msg.extend_from_slice(&flush.0.to_be_bytes());
        msg.extend_from_slice(&flush.0.to_be_bytes());
        msg.extend_from_slice(&pg_now().to_be_bytes());
        msg.extend_from_slice(&[u8::from(reply)]);
        frontend::CopyData::new(msg.freeze())?.write(&mut self.wbuf);
        self.flush().await
    }

    /// Ends our side of a COPY stream.
    pub async fn copy_done(&mut self) -> Result<(), PgError> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await
    }

    /// Sends a query without waiting for its reply (for BASE_BACKUP, whose reply
    /// is read piece by piece).
    pub async fn send_query(&mut self, q: &str) -> Result<(), PgError> {
        frontend::query(q, &mut self.wbuf)?;
        self.flush().await
    }

    /// The rows of the next result set of a query in progress, up to its
    /// CommandComplete (for commands that return several).
    pub async fn next_result(&mut self) -> Result<Rows, PgError> {
        let mut rows = Vec::new();
        loop {
            match self.recv().await? {
                Message::RowDescription(_) => {}
                Message::DataRow(body) => rows.push(data_row(&body)?),
                Message::CommandComplete(_) => return Ok(rows),
                Message::ErrorResponse(body) => {
                    let e = server_error(body);
                    self.finish_query().await.ok();
                    return Err(e);
                }
                Message::NoticeResponse(body) => tracing::info!("PostgreSQL: {}", notice_text(body)),
                Message::CopyOutResponse(_) => {
                    return Err(PgError::protocol("COPY started where a result was expected"))
                }
                _ => {}
            }
        }
    }

    /// Waits for the CopyOutResponse that starts a COPY stream.
    pub async fn expect_copy_out(&mut self) -> Result<(), PgError> {
        loop {
            match self.recv().await? {
                Message::CopyOutResponse(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let e = server_error(body);
                    self.finish_query().await.ok();
                    return Err(e);
                }
                Message::NoticeResponse(body) => tracing::info!("PostgreSQL: {}", notice_text(body)),
                _ => return Err(PgError::protocol("expected a COPY stream")),
            }
        }
    }

    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
    }
}

enum Raw {
    Message(Message),
    CopyBoth,
}

/// The largest message ebb takes from a server: far above any it sends (WAL comes
/// in messages of at most a few hundred KiB), far below what a bad length could make
/// it allocate (the parser reserves the length a header claims, up to 4 GiB).
const MAX_MESSAGE: usize = 64 << 20;

/// The next whole message in `buf`, if it holds one.
pub(crate) fn parse_message(buf: &mut BytesMut) -> Result<Option<Message>, PgError> {
    if let Some(h) = backend::Header::parse(buf)? {
        if h.len() as usize > MAX_MESSAGE {
            return Err(PgError::protocol(format!(
                "the server sent a message of {} bytes (type {:?}), more than any it sends",
                h.len(),
                h.tag() as char
            )));
        }
    }
    Ok(Message::parse(buf)?)
}

/// A message of the replication stream (a CopyData body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyData {
    /// WAL from `start`; the server has WAL up to `end`.
    XLogData { start: Lsn, end: Lsn, data: Bytes },
    /// The server has WAL up to `end`, and wants a status update if `reply`.
    Keepalive { end: Lsn, reply: bool },
}

/// Parses a replication message: `w` (start, end, clock, WAL) or `k` (end, clock,
/// reply), big-endian. Anything short or unknown is an error, never a panic.
pub fn parse_copy_data(msg: Bytes) -> Result<CopyData, String> {
    let u64_at = |i: usize| msg.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    match msg.first() {
        Some(b'w') => {
            let short = || "short XLogData".to_string();
            let (start, end) = (u64_at(1).ok_or_else(short)?, u64_at(9).ok_or_else(short)?);
            let data = msg.get(25..).ok_or_else(short)?;
            Ok(CopyData::XLogData { start: Lsn(start), end: Lsn(end), data: msg.slice_ref(data) })
        }
        Some(b'k') => {
            let end = u64_at(1).ok_or("short keepalive")?;
            let reply = *msg.get(17).ok_or("short keepalive")? != 0;
            Ok(CopyData::Keepalive { end: Lsn(end), reply })
        }
        _ => Err("unknown message type".into()),
    }
}

pub(crate) fn data_row(body: &backend::DataRowBody) -> Result<Vec<Option<String>>, PgError> {
    let buf = body.buffer();
    let mut out = Vec::new();
    let mut ranges = body.ranges();
    while let Some(r) = ranges.next()? {
        out.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
    }
    Ok(out)
}

pub(crate) fn server_error(body: backend::ErrorResponseBody) -> PgError {
    let (mut code, mut message, mut hint) = (String::new(), String::new(), None);
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'H' => hint = Some(String::from_utf8_lossy(f.value_bytes()).into_owned()),
            _ => {}
        }
    }
    PgError::Server { code, message, hint }
}

pub(crate) fn notice_text(body: backend::NoticeResponseBody) -> String {
    let mut fields = body.fields();
    let mut text = String::new();
    while let Ok(Some(f)) = fields.next() {
        if f.type_() == b'M' {
            text = String::from_utf8_lossy(f.value_bytes()).into_owned();
        }
    }
    text
}

/// A replication slot name as an identifier: slot names are `[a-z0-9_]`, checked
/// by the caller, so quoting is belt and braces.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Microseconds since 2000-01-01, PostgreSQL's clock.
pub fn pg_now() -> i64 {
    let now = jiff::Timestamp::now().as_microsecond();
    now - PG_EPOCH_MICROS
}

/// 2000-01-01T00:00:00Z in Unix microseconds.
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 15 of issue 15: an XLogData message shorter than its header is an error
    /// (it used to panic, slicing past its end), as is a message longer than any a
    /// server sends, before anything is allocated for it.
    #[test]
    fn short_and_huge_messages_are_errors() {
        let mut w = vec![b'w'];
        w.extend(0x28u64.to_be_bytes());
        w.extend(0x1000u64.to_be_bytes());
        assert!(parse_copy_data(Bytes::from(w.clone())).is_err(), "17 bytes: no clock, no WAL");
        w.extend(0u64.to_be_bytes());
        w.extend(b"wal");
        let parsed = parse_copy_data(Bytes::from(w)).unwrap();
        assert_eq!(parsed, CopyData::XLogData { start: Lsn(0x28), end: Lsn(0x1000), data: Bytes::from_static(b"wal") });
        assert!(parse_copy_data(Bytes::from_static(b"k\0\0")).is_err());

        let mut huge = BytesMut::from(&b"d\xff\xff\xff\xff"[..]);
        assert!(parse_message(&mut huge).is_err());
        assert!(huge.capacity() < 1 << 20, "nothing was reserved for it");
    }
}
