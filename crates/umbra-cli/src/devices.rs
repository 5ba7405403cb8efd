//! `umbra devices …` and `umbra link`: this account's devices, adding one
//! by a one-time link, and removing one.

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use umbra_client::{Client, ClientOptions, DeviceId, LinkString};

use crate::escape::printable;
use crate::{Cli, Out, account, date, online, passphrase, qr};

#[derive(Debug, Subcommand)]
pub(crate) enum DevicesCommand {
    /// List the devices of this account, or of a contact (ACCOUNT), current
    /// and removed. The list is signed with the account's key and checked
    /// here: a device the server added on its own is refused, not shown.
    List { account: Option<String> },
    /// Add a device to this account: shows a one-time link (text and QR
    /// code) to give to `umbra link` on the new device, then waits for it
    /// (ten minutes at most) and hands it the account's contacts and
    /// unexpired history, and adds it to every conversation. Anyone who
    /// sees the link before it is used can take the device's place: show
    /// it only to the new device.
    Link {
        /// Send the vault's notes too (without it they stay on this
        /// device only).
        #[arg(long)]
        with_vault: bool,
    },
    /// Remove a device (its number, or its name, from `devices list`) from
    /// this account at once: it can no longer log in as that device, its
    /// conversations remove it, and it reads nothing sent to them
    /// afterwards. Works from any other device of the account. A device
    /// that was linked holds the account key: remove a stolen one at once,
    /// and know that until account keys can be replaced, whoever holds it
    /// can still act as the account (device 1) and end its line, though
    /// not erase the other devices (only the wipe code does that).
    Remove { device: String },
}

pub(crate) async fn devices(cli: &Cli, out: &Out, command: &DevicesCommand) -> anyhow::Result<()> {
    match command {
        DevicesCommand::List { account: whose } => {
            let whose = whose.as_deref().map(account).transpose()?;
            let client = online(cli).await?;
            let devices = match &whose {
                None => client.devices().await?,
                Some(id) => client.contact_devices(id).await?,
            };
            if out.json {
                for device in &devices {
                    println!("{}", json!(device));
                }
            } else {
                for d in &devices {
                    // The name is the account's choice: shown escaped.
                    let name = if d.name.is_empty() {
                        "(no name)".into()
                    } else {
                        printable(&d.name)
                    };
                    let mut line = format!(
                        "device {}  {name}  key {}…  added {}",
                        d.id,
                        d.key.get(..16).unwrap_or(&d.key),
                        date(d.added_at)
                    );
                    if let (Some(at), Some(by)) = (d.removed_at, d.removed_by) {
                        line.push_str(&format!("  removed {} by device {by}", date(at)));
                    }
                    if d.this_device {
                        line.push_str("  (this device)");
                    }
                    println!("{line}");
                }
            }
        }
        DevicesCommand::Link { with_vault } => {
            let client = online(cli).await?;
            let mut pending = client.start_link().await?;
            if *with_vault {
                pending = pending.with_vault();
            }
            let link = pending.link_string().to_string();
            out.value(
                json!({ "link": link, "expires_at": pending.expires_at() }),
                || {
                    let mut text = format!(
                        "On the new device, run `umbra link` and paste this link (or scan the code):\n\n  {link}\n\n\
                         It works once, until {}. Show it to nobody else: whoever uses it first \
                         becomes a device of your account.",
                        crate::rfc3339(pending.expires_at())
                    );
                    if let Some(qr) = qr(&link) {
                        text.push_str(&format!("\n\n{qr}"));
                    }
                    text.push_str("\n\nWaiting for the new device…");
                    text
                },
            );
            let linked = pending.finish().await?;
            out.value(
                json!({
                    "device": linked.device,
                    "name": linked.name,
                    "conversations": linked.conversations,
                    "failed": linked.failed,
                }),
                || {
                    let mut text = format!(
                        "Linked device {} ({}). It is in {} conversation(s).",
                        linked.device,
                        printable(&linked.name),
                        linked.conversations
                    );
                    if linked.failed > 0 {
                        text.push_str(&format!(
                            "\n{} conversation(s) could not add it yet; it has their history.",
                            linked.failed
                        ));
                    }
                    text
                },
            );
        }
        DevicesCommand::Remove { device } => {
            let client = online(cli).await?;
            let device = which_device(&client, device).await?;
            client.remove_device(device).await?;
            out.value(json!({ "removed": device }), || {
                format!(
                    "Removed device {device}. It can no longer log in as that device, and reads nothing sent to your conversations from now on."
                )
            });
        }
    }
    Ok(())
}

/// The current device of this account that `given` names: its number, or
/// its name if exactly one current device has it.
async fn which_device(client: &Client, given: &str) -> anyhow::Result<DeviceId> {
    if let Ok(number) = given.parse::<u32>() {
        return Ok(DeviceId(number));
    }
    let named: Vec<DeviceId> = client
        .devices()
        .await?
        .into_iter()
        .filter(|d| d.removed_at.is_none() && d.name == given)
        .map(|d| d.id)
        .collect();
    match named.as_slice() {
        [one] => Ok(*one),
        [] => anyhow::bail!(
            "no current device of this account is named {:?}; see `umbra devices list`",
            printable(given)
        ),
        _ => anyhow::bail!(
            "{} devices are named {:?}; remove one by its number (`umbra devices list`)",
            named.len(),
            printable(given)
        ),
    }
}

/// `umbra link STRING`: becomes a new device of the account that showed it.
pub(crate) async fn link(
    cli: &Cli,
    out: &Out,
    link: Option<&str>,
    name: &str,
) -> anyhow::Result<()> {
    let typed;
    let link = match link {
        Some(link) => link,
        None => {
            eprint!("Paste the link from `umbra devices link` (umbra-link://…): ");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the link")?;
            typed = line;
            typed.trim()
        }
    };
    let link: LinkString = link
        .parse()
        .context("this is not a valid link (it starts with umbra-link://)")?;
    let passphrase = passphrase(true)?;
    let (client, joined) = Client::join_link(
        &cli.home,
        &passphrase,
        &link,
        name,
        ClientOptions::default(),
    )
    .await?;
    // What the existing device sent meanwhile (the conversations' Welcomes).
    client.sync().await?;
    out.value(
        json!({
            "account_id": joined.account,
            "device": joined.device,
            "contacts": joined.contacts,
            "messages": joined.messages,
            "vault_notes": joined.vault_notes,
            "conversations": joined.conversations,
            "home": cli.home,
        }),
        || {
            let mut text = format!(
                "Linked. This is device {} of account {}, with {} contact(s) and {} message(s) of history.",
                joined.device, joined.account, joined.contacts, joined.messages
            );
            if joined.vault_notes > 0 {
                text.push_str(&format!(
                    "\nThe vault came along: {} note(s).",
                    joined.vault_notes
                ));
            }
            match joined.conversations {
                Some(n) => text.push_str(&format!("\nIt is in {n} conversation(s).")),
                None => text.push_str(
                    "\nThe other device has not added it to the conversations yet; they appear when it does.",
                ),
            }
            text
        },
    );
    Ok(())
}
