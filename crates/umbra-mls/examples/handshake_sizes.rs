//! What each suite costs on the wire: the size of a KeyPackage, of the
//! commit that adds everyone to a new group of N devices (as Umbra starts a
//! conversation: one add commit), its Welcome and GroupInfo, of a later
//! self-update commit with its GroupInfo, and of a 256-byte text, for N =
//! 2, 100 and 1,000, in the post-quantum and the classical suite. The
//! delivery service takes a commit, its Welcome and GroupInfo in one frame
//! of at most 1 MiB (`umbra_proto::MAX_FRAME_BYTES`); the last column says
//! whether it fits.
//!
//! Run with `cargo run --release -p umbra-mls --example handshake_sizes`.

use rusqlite::Connection;
use umbra_mls::{DeviceSigner, Group, GroupConfig, Provider, Suite, new_key_package};
use umbra_proto::AccountId;

const SIZES: [usize; 3] = [2, 100, 1000];

fn account_id(index: usize) -> AccountId {
    let alphabet = AccountId::ALPHABET;
    let mut rest = index;
    let mut text = [alphabet[0]; AccountId::LEN];
    for slot in text.iter_mut().rev() {
        *slot = alphabet[rest % alphabet.len()];
        rest /= alphabet.len();
    }
    AccountId::parse(std::str::from_utf8(&text).expect("ASCII")).expect("valid account ID")
}

fn signer(index: usize) -> DeviceSigner {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&(index as u64 + 1).to_be_bytes());
    DeviceSigner::from_secret(&secret)
}

fn storage() -> Connection {
    let mut db = Connection::open_in_memory().expect("an in-memory database");
    umbra_mls::init_storage(&mut db).expect("openmls's tables");
    db
}

fn main() {
    let crypto = umbra_mls::Crypto::default();
    let limit = umbra_proto::MAX_FRAME_BYTES;
    println!(
        "| suite | devices | KeyPackage | add commit | Welcome | GroupInfo | add frame fits 1 MiB | self-update commit + GroupInfo | 256-byte text |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for suite in [Suite::MlKem768X25519Aes128GcmEd25519, Suite::CLASSICAL] {
        let config = GroupConfig {
            suite,
            ..GroupConfig::default()
        };
        for size in SIZES {
            let creator_db = storage();
            let creator = Provider::new(&crypto, &creator_db);
            let creator_signer = signer(0);
            let mut group = Group::create(&creator, &creator_signer, &account_id(0), &config, 0)
                .expect("group");
            let others_db = storage();
            let others = Provider::new(&crypto, &others_db);
            let key_packages: Vec<Vec<u8>> = (1..size)
                .map(|index| {
                    new_key_package(&others, &signer(index), &account_id(index), suite, false)
                        .expect("a KeyPackage")
                })
                .collect();
            let added = group
                .add_members(&creator, &creator_signer, &key_packages)
                .expect("the add commit");
            group.merge_pending_commit(&creator).expect("merged");
            let welcome = added.welcome.as_ref().map_or(0, Vec::len);
            let frame = added.commit.len() + welcome + added.group_info.len();
            let update = group
                .self_update(&creator, &creator_signer)
                .expect("a self-update");
            group.merge_pending_commit(&creator).expect("merged");
            let text = group
                .encrypt(&creator, &creator_signer, &[0x5A; 256])
                .expect("a text");
            println!(
                "| {} | {size} | {} | {} | {welcome} | {} | {} ({frame}) | {} | {} |",
                suite.kind(),
                key_packages.first().map_or(0, Vec::len),
                added.commit.len(),
                added.group_info.len(),
                if frame <= limit { "yes" } else { "no" },
                update.commit.len() + update.group_info.len(),
                text.len(),
            );
        }
    }
}
