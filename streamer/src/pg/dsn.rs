//! The DSN a PostgreSQL command is given: parsed, with the password from
//! `PGPASSWORD` when it names none (as libpq does), and shown to people without the
//! password.

use tokio_postgres::config::Host;

use super::basebackup::BaseBackupOptions;
use super::wire::{dsn_user, parse_dsn, PgError};

/// A parsed DSN and how it is shown.
#[derive(Debug, Clone)]
pub struct Dsn {
    pub config: tokio_postgres::Config,
    /// Hosts, port and user: never the password.
    pub shown: String,
}

impl Dsn {
    /// Parses `text`, taking the password from `PGPASSWORD` when `text` names none.
    pub fn parse(text: &str) -> Result<Dsn, PgError> {
        Dsn::parse_with(text, std::env::var("PGPASSWORD").ok())
    }

    /// Parses `text`, taking `password` when `text` names none.
    pub fn parse_with(text: &str, password: Option<String>) -> Result<Dsn, PgError> {
        let mut config = parse_dsn(text)?;
        if config.get_password().is_none() {
            if let Some(pw) = password {
                config.password(pw);
            }
        }
        let shown = shown(&config);
        Ok(Dsn { config, shown })
    }

    /// What a base backup of `source` through this DSN needs, made on `host`.
    pub fn base_backup(&self, source: &str, host: String) -> BaseBackupOptions {
        BaseBackupOptions {
            source: source.to_string(),
            dsn: self.config.clone(),
            dsn_display: self.shown.clone(),
            host,
        }
    }
}

/// `host=... port=... user=...`: where ebb connects, as whom.
fn shown(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let mut shown = format!("host={}", if hosts.is_empty() { "(default socket)".into() } else { hosts.join(",") });
    if let Some(p) = config.get_ports().first() {
        shown.push_str(&format!(" port={p}"));
    }
    shown.push_str(&format!(" user={}", dsn_user(config)));
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_without_the_password() {
        let d = Dsn::parse_with("host=db1,db2 port=5433 user=u password=secret dbname=x", None).unwrap();
        assert_eq!(d.shown, "host=db1,db2 port=5433 user=u");
        assert_eq!(d.config.get_password(), Some(&b"secret"[..]));
        let d = Dsn::parse_with("host=/run/postgresql user=u", None).unwrap();
        assert_eq!(d.shown, "host=/run/postgresql user=u");
        let d = Dsn::parse_with("user=u", None).unwrap();
        assert_eq!(d.shown, "host=(default socket) user=u");
    }

    #[test]
    fn the_password_given_apart_only_when_the_dsn_names_none() {
        let d = Dsn::parse_with("host=db user=u", Some("env".into())).unwrap();
        assert_eq!(d.config.get_password(), Some(&b"env"[..]));
        let d = Dsn::parse_with("host=db user=u password=own", Some("env".into())).unwrap();
        assert_eq!(d.config.get_password(), Some(&b"own"[..]));
        assert!(matches!(Dsn::parse_with("host='db", None), Err(PgError::BadDsn(_))));
    }

    #[test]
    fn a_base_backup_through_it() {
        let d = Dsn::parse_with("host=db user=u password=p", None).unwrap();
        let bb = d.base_backup("main", "h1".into());
        assert_eq!((bb.source.as_str(), bb.dsn_display.as_str(), bb.host.as_str()), ("main", d.shown.as_str(), "h1"));
    }
}
