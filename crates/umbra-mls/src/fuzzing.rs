//! Entry points for the fuzz targets in `fuzz/`: what a device does with
//! bytes the server hands it (a Welcome, a commit, a proposal, an
//! application message, the GroupInfo it rejoins from).
//!
//! Random bytes alone rarely get past the first parse, so each input also
//! picks one of a live group's real messages, made once per process, and
//! changes it where the input says: the mutated message then reaches the
//! deep checks (signatures, tree, epoch, decryption) of a device that is
//! really in that group. Every input runs inside a transaction on the
//! device's storage that is rolled back, so inputs do not depend on each
//! other. Not part of the library's API.

use std::cell::RefCell;

use rusqlite::Connection;
use umbra_proto::AccountId;

use crate::{Crypto, DeviceSigner, Group, GroupConfig, Provider};

/// A member's device: its signer, account, crypto and storage.
struct Member {
    signer: DeviceSigner,
    account: AccountId,
    crypto: Crypto,
    db: Connection,
}

impl Member {
    fn new(account: &str, seed: u8) -> Option<Member> {
        let mut db = Connection::open_in_memory().ok()?;
        crate::init_storage(&mut db).ok()?;
        Some(Member {
            signer: DeviceSigner::from_secret(&[seed; 32]),
            account: AccountId::parse(account).ok()?,
            crypto: Crypto::default(),
            db,
        })
    }

    fn provider(&self) -> Provider<'_> {
        Provider::new(&self.crypto, &self.db)
    }
}

/// Bob's device in a group with Alice, and real messages Bob has not yet
/// processed: a commit, an application message, the next epoch's GroupInfo,
/// and a Welcome to a second group for one of Bob's KeyPackages.
struct Scene {
    bob: Member,
    group_id: Vec<u8>,
    templates: Vec<Vec<u8>>,
}

fn scene() -> Option<Scene> {
    let config = GroupConfig::default();
    let alice = Member::new("AAAAAAAA", 1)?;
    let bob = Member::new("BBBBBBBB", 2)?;
    let key_package = |member: &Member| {
        crate::new_key_package(
            &member.provider(),
            &member.signer,
            &member.account,
            config.suite,
            false,
        )
        .ok()
    };
    let mut group =
        Group::create(&alice.provider(), &alice.signer, &alice.account, &config, 0).ok()?;
    let added = group
        .add_members(&alice.provider(), &alice.signer, &[key_package(&bob)?])
        .ok()?;
    group.merge_pending_commit(&alice.provider()).ok()?;
    Group::join(&bob.provider(), added.welcome.as_deref()?, &config).ok()?;
    let application = group
        .encrypt(&alice.provider(), &alice.signer, b"hello")
        .ok()?;
    let update = group.self_update(&alice.provider(), &alice.signer).ok()?;
    let mut second =
        Group::create(&alice.provider(), &alice.signer, &alice.account, &config, 0).ok()?;
    let invited = second
        .add_members(&alice.provider(), &alice.signer, &[key_package(&bob)?])
        .ok()?;
    Some(Scene {
        group_id: group.id(),
        bob,
        templates: vec![
            application,
            update.commit,
            update.group_info,
            invited.welcome?,
            added.commit,
        ],
    })
}

thread_local! {
    static SCENE: RefCell<Option<Scene>> = RefCell::new(scene());
}

/// One fuzz input: `[template, (position, byte)*]` mutates a real message,
/// or `[0xff, bytes…]` is taken as it is. Bob's device processes it as a
/// message of his group, as a Welcome, and as the GroupInfo to rejoin from.
pub fn device_input(input: &[u8]) {
    SCENE.with(|scene| {
        let scene = scene.borrow();
        let Some(scene) = scene.as_ref() else {
            return;
        };
        let bytes = mutate(&scene.templates, input);
        let bob = &scene.bob;
        if bob.db.execute_batch("BEGIN").is_err() {
            return;
        }
        let provider = bob.provider();
        let config = GroupConfig::default();
        if let Ok(Some(mut group)) = Group::load(&provider, &scene.group_id) {
            let _ = group.process(&provider, &bytes);
        }
        let _ = Group::join(&provider, &bytes, &config);
        let _ = Group::rejoin(
            &provider,
            &bob.signer,
            &bob.account,
            &config,
            (&scene.group_id, 1),
            &bytes,
        );
        let _ = bob.db.execute_batch("ROLLBACK");
    });
}

fn mutate(templates: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let Some((&choice, edits)) = input.split_first() else {
        return Vec::new();
    };
    if choice == 0xff || templates.is_empty() {
        return edits.to_vec();
    }
    let mut bytes = templates
        .get(usize::from(choice) % templates.len())
        .cloned()
        .unwrap_or_default();
    for edit in edits.chunks_exact(3) {
        if let [high, low, value] = edit
            && !bytes.is_empty()
        {
            let at = usize::from(u16::from_be_bytes([*high, *low])) % bytes.len();
            if let Some(byte) = bytes.get_mut(at) {
                *byte = *value;
            }
        }
    }
    // A trailing byte or two truncates the message there instead.
    if let [.., cut] = edits
        && edits.len() % 3 == 1
    {
        bytes.truncate(usize::from(*cut) * bytes.len() / 256);
    }
    bytes
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_scene_is_built_and_inputs_run() {
        super::SCENE.with(|scene| assert!(scene.borrow().is_some(), "no scene"));
        // An untouched template, a mutated one, a truncated one, raw bytes.
        for input in [&[0u8][..], &[1, 0, 40, 7], &[3, 200], &[0xff, 1, 2, 3]] {
            super::device_input(input);
        }
    }
}
