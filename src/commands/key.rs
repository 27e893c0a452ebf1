//! `ebb key list|add|remove`: the key slots that unlock the repository.

use std::process::ExitCode;

use anyhow::Result;
use catalog::Secret;
use serde_json::json;

use crate::cli::{Global, KeyCommand};
use crate::context::{host, open};
use crate::output::table;
use crate::secret::new_password;

pub async fn key(g: &Global, cmd: KeyCommand) -> Result<ExitCode> {
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
