//! `tidesync-hub token`: scoped API tokens, issued and revoked where the CA is.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tidesync::daemon::CRL_FILE;
use tidesync::model::Grant;
use tidesync::net::crl::Revoked;
use tidesync::net::token;
use tidesync_cli::files;

use crate::cli::TokenCommand;
use crate::run::{current_list, load_ca, read_if_present, sign_list, write_private};

/// Every token revoked, one id per line, beside the CA key: a revocation list issued later
/// (by `revoke`, or after `crl.pem` was lost) still lists them.
const REVOKED_TOKENS: &str = "revoked-tokens";

/// Runs one `token` command.
pub fn run(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create {
            data,
            grants,
            days,
            name,
        } => create(&data, &grants, days, &name),
        TokenCommand::Revoke { data, id, token } => {
            let serial = match (id, token) {
                (Some(id), _) => token::unhex(id.trim())
                    .filter(|s| !s.is_empty())
                    .context("--id is not a token id (hex, as `token create` printed it)")?,
                (None, Some(t)) => token::read_id(t.trim())?,
                (None, None) => bail!("--id or --token is required"),
            };
            revoke(&data, &serial)
        }
    }
}

fn create(data: &Path, grants: &[String], days: u32, name: &str) -> Result<()> {
    let grants = grants
        .iter()
        .map(|g| g.parse::<Grant>())
        .collect::<Result<Vec<_>, _>>()
        .context("--grant")?;
    let ca = load_ca(data)?;
    let valid = Duration::from_secs(u64::from(days) * 86_400);
    let (text, t) = token::issue(ca.key_pem(), name, &grants, valid)?;
    // The token goes to stdout alone, for scripts; what it is goes to stderr.
    eprintln!(
        "token {} for {name:?}: {}; valid {days} days; revoke with `tidesync-hub token revoke --data {} --id {}`",
        t.id(),
        grants
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        data.display(),
        t.id()
    );
    println!("{text}");
    Ok(())
}

fn revoke(data: &Path, serial: &[u8]) -> Result<()> {
    let _lock = files::lock(data)?;
    let ca = load_ca(data)?;
    let old = current_list(data, &ca)?;
    let mut entries = old
        .as_ref()
        .map(|c| c.entries().to_vec())
        .unwrap_or_default();
    let id = token::hex(serial);
    let mut ids = revoked_serials(data)?;
    if !ids.iter().any(|s| s == serial) {
        ids.push(serial.to_vec());
        let text: String = ids.iter().map(|s| format!("{}\n", token::hex(s))).collect();
        write_private(&data.join(REVOKED_TOKENS), &text)?;
    }
    if entries.iter().any(|e| e.serial == serial) {
        println!(
            "token {id} is already revoked (revocation list number {})",
            old.as_ref().map_or(0, |c| c.number())
        );
        return Ok(());
    }
    entries.push(Revoked {
        serial: serial.to_vec(),
        at: std::time::SystemTime::now(),
    });
    let number = sign_list(data, &ca, old.as_ref(), &entries)?;
    println!(
        "revoked token {id}: revocation list number {number} in {}; a hub running from here \
         takes it up at once and passes it to every node (elsewhere, copy it into a running \
         hub's data directory as {CRL_FILE})",
        data.join(CRL_FILE).display()
    );
    Ok(())
}

/// The serials of the tokens revoked from `ca_dir`.
pub(crate) fn revoked_serials(ca_dir: &Path) -> Result<Vec<Vec<u8>>> {
    let path = ca_dir.join(REVOKED_TOKENS);
    let Some(text) = read_if_present(&path)? else {
        return Ok(Vec::new());
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            token::unhex(l).with_context(|| format!("{}: a damaged line {l:?}", path.display()))
        })
        .collect()
}
