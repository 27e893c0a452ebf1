//! Where the secret comes from: a key file, EBB_PASSWORD, a password file, or a prompt
//! on a terminal. Never from a command-line argument.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};
use catalog::Secret;

use crate::cli::Global;

pub fn secret(g: &Global, confirm: bool) -> Result<Secret> {
    if let Some(path) = &g.key_file {
        return read_key_file(path);
    }
    if let Some(pw) = std::env::var_os("EBB_PASSWORD") {
        return Ok(Secret::Password(pw.into_encoded_bytes()));
    }
    if let Some(path) = &g.password_file {
        return read_password_file(path).map(Secret::Password);
    }
    prompt("Repository password: ", confirm).map(Secret::Password)
}

/// The password for a new key slot: EBB_NEW_PASSWORD, a file, or a prompt.
pub fn new_password(file: Option<&Path>) -> Result<Vec<u8>> {
    if let Some(path) = file {
        return read_password_file(path);
    }
    if let Some(pw) = std::env::var_os("EBB_NEW_PASSWORD") {
        return Ok(pw.into_encoded_bytes());
    }
    prompt("New password: ", true)
}

fn read_password_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("read password file {}", path.display()))?;
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("password file {} is empty", path.display());
    }
    Ok(line.to_vec())
}

fn read_key_file(path: &Path) -> Result<Secret> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read key file {}", path.display()))?;
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
