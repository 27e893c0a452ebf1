//! Where the secret comes from: a key file, EBB_PASSWORD, a password file, or a prompt
//! on a terminal. Never from a command-line argument. A new password (for `init`
//! and `key add`) must not be empty or only whitespace.

use std::io::IsTerminal;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use catalog::Secret;

use crate::cli::Global;

/// The secret that opens the repository; `new` for the first one of a repository
/// (`ebb init`), which is asked for twice on a terminal and must not be blank.
pub fn secret(g: &Global, new: bool) -> Result<Secret> {
    if let Some(path) = &g.key_file {
        return read_key_file(path);
    }
    let (pw, from) = if let Some(pw) = std::env::var_os("EBB_PASSWORD") {
        (pw.into_encoded_bytes(), "EBB_PASSWORD")
    } else if let Some(path) = &g.password_file {
        (read_password_file(path)?, "the password file")
    } else {
        (prompt("Repository password: ", new)?, "the prompt")
    };
    if new {
        check_new(&pw, from)?;
    }
    Ok(Secret::Password(pw))
}

/// The password for a new key slot: EBB_NEW_PASSWORD, a file, or a prompt.
pub fn new_password(file: Option<&Path>) -> Result<Vec<u8>> {
    let (pw, from) = if let Some(path) = file {
        (read_password_file(path)?, "the password file")
    } else if let Some(pw) = std::env::var_os("EBB_NEW_PASSWORD") {
        (pw.into_encoded_bytes(), "EBB_NEW_PASSWORD")
    } else {
        (prompt("New password: ", true)?, "the prompt")
    };
    check_new(&pw, from)?;
    Ok(pw)
}

/// A new password must say something: an empty one (an unset variable expanded
/// to nothing, say) would lock the data behind no secret at all.
fn check_new(pw: &[u8], from: &str) -> Result<()> {
    if pw.iter().all(u8::is_ascii_whitespace) {
        bail!("the new password from {from} is empty or only whitespace: choose a real password");
    }
    Ok(())
}

/// Warns when a file holding a secret can be read by other users.
fn warn_if_shared(path: &Path, what: &str) {
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode();
        if mode & 0o044 != 0 {
            eprintln!(
                "warning: {what} {} can be read by other users (mode {:o}): `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
}

fn read_password_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("read password file {}", path.display()))?;
    warn_if_shared(path, "password file");
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("password file {} is empty", path.display());
    }
    Ok(line.to_vec())
}

fn read_key_file(path: &Path) -> Result<Secret> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read key file {}", path.display()))?;
    warn_if_shared(path, "key file");
    catalog::decode_key_file(&text).map(Secret::KeyFile).with_context(|| {
        format!("{} is not an ebb key file (expected a line `ebb-key-v1 <64 hex digits>`)", path.display())
    })
}

fn prompt(question: &str, confirm: bool) -> Result<Vec<u8>> {
    if !std::io::stdin().is_terminal() {
        bail!("no password given: set EBB_PASSWORD or EBB_PASSWORD_FILE, pass --password-file or --key-file, or run on a terminal");
    }
    let pw = rpassword::prompt_password(question).context("read password from the terminal")?;
    if pw.is_empty() {
        bail!("the password is empty");
    }
    if confirm && rpassword::prompt_password("Repeat it: ").context("read password from the terminal")? != pw {
        bail!("the two passwords differ");
    }
    Ok(pw.into_bytes())
}
