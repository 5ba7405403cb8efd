//! What MLS costs a device, per operation, at group sizes 2, 100 and 1000:
//! encrypting and decrypting one application message, creating a
//! self-update commit, and processing another member's commit; and what a
//! commit costs the delivery service at group sizes 10, 100 and 1000:
//! validating it against the group's public state (`commit_validate`: load
//! the stored state, process and merge the commit, store the state), next
//! to the header check that was all it did before (`commit_header`). Run with
//! `cargo bench -p umbra-mls --bench mls`; criterion compares each run with
//! the last, so a regression shows as a change in these figures.
//!
//! Every figure is measured for both suites Umbra offers: the post-quantum
//! default (`post-quantum/N`) and the classical one (`classical/N`).
//!
//! Each group is built once per suite and size and reused. Only three members hold
//! real state (the creator, a sender and a receiver); the others contribute a
//! KeyPackage made by their own signer and storage, and never join. As in
//! Umbra, members are added by add-only commits, so the tree's parent nodes
//! stay blank until members update: a commit encrypts its path secrets to up
//! to n - 1 leaves, the cost a new Umbra group really has.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, criterion_group,
    criterion_main,
};
use rusqlite::Connection;
use umbra_mls::{
    Crypto, DeviceSigner, Group, GroupConfig, Incoming, Provider, PublicState, Suite,
    new_key_package,
};
use umbra_proto::AccountId;

const GROUP_SIZES: [usize; 3] = [2, 100, 1000];
/// The post-quantum default and the classical fallback, side by side.
const SUITES: [Suite; 2] = [Suite::MlKem768X25519Aes128GcmEd25519, Suite::CLASSICAL];
/// Group sizes for the delivery service's cost per commit.
const SERVER_GROUP_SIZES: [usize; 3] = [10, 100, 1000];
/// Group sizes from which a benchmark is too slow for criterion's default
/// 100 samples.
const LARGE_GROUP: usize = 1000;
/// KeyPackages per add commit while a group is built.
const ADD_BATCH: usize = 100;
const MESSAGE: [u8; 256] = [0x5A; 256];

/// One device: its identity, cryptography provider and MLS storage.
struct Device {
    account: AccountId,
    signer: DeviceSigner,
    crypto: Crypto,
    db: Connection,
}

impl Device {
    fn new(index: usize) -> Device {
        let mut db = Connection::open_in_memory().expect("opening an in-memory database");
        umbra_mls::init_storage(&mut db).expect("creating openmls's tables");
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&(index as u64 + 1).to_be_bytes());
        Device {
            account: account_id(index),
            signer: DeviceSigner::from_secret(&secret),
            crypto: Crypto::default(),
            db,
        }
    }

    fn provider(&self) -> Provider<'_> {
        Provider::new(&self.crypto, &self.db)
    }

    fn key_package(&self, suite: Suite) -> Vec<u8> {
        new_key_package(&self.provider(), &self.signer, &self.account, suite, false)
            .expect("creating a KeyPackage")
    }
}

/// A distinct valid account ID per index: the index in base 31, written in
/// the account alphabet.
fn account_id(index: usize) -> AccountId {
    let alphabet = AccountId::ALPHABET;
    let mut rest = index;
    let mut text = [alphabet[0]; AccountId::LEN];
    for slot in text.iter_mut().rev() {
        *slot = alphabet[rest % alphabet.len()];
        rest /= alphabet.len();
    }
    AccountId::parse(std::str::from_utf8(&text).expect("the alphabet is ASCII"))
        .expect("built from the account alphabet")
}

/// A device that holds a group's state.
struct Member {
    device: Device,
    group: Group,
}

impl Member {
    /// Makes a self-update commit and merges it as the delivery service
    /// had accepted it; `others` process it. Returns the commit (with the
    /// GroupInfo it is submitted with).
    fn update_for<'a>(
        &mut self,
        others: impl IntoIterator<Item = &'a mut Member>,
    ) -> umbra_mls::CommitOutput {
        let provider = self.device.provider();
        let commit = self
            .group
            .self_update(&provider, &self.device.signer)
            .expect("a self-update");
        self.group
            .merge_pending_commit(&provider)
            .expect("merging the self-update");
        for other in others {
            other.process_commit(&commit.commit);
        }
        commit
    }

    fn process_commit(&mut self, commit: &[u8]) {
        let incoming = self
            .group
            .process(&self.device.provider(), commit)
            .expect("processing a commit");
        assert!(
            matches!(incoming, Incoming::Commit { .. }),
            "expected a commit, got {incoming:?}"
        );
    }
}

/// A group of `size` members, three of them (two when `size` is 2) real.
struct Fixture {
    creator: Member,
    receiver: Member,
    /// The third real member; in a group of two the creator sends instead.
    third: Option<Member>,
}

impl Fixture {
    fn build(suite: Suite, size: usize) -> Fixture {
        assert!(size >= 2, "a fixture needs a sender and a receiver");
        let config = GroupConfig {
            suite,
            ..GroupConfig::default()
        };
        let creator_device = Device::new(0);
        let mut group = Group::create(
            &creator_device.provider(),
            &creator_device.signer,
            &creator_device.account,
            &config,
            0,
        )
        .expect("creating the group");

        // Fill the group first, so that the real members join the finished
        // tree from one Welcome and process no add commit.
        let real_count = size.min(3);
        let fillers: Vec<usize> = (real_count..size).collect();
        for batch in fillers.chunks(ADD_BATCH) {
            let key_packages: Vec<Vec<u8>> = batch
                .iter()
                .map(|&index| Device::new(index).key_package(suite))
                .collect();
            group
                .add_members(
                    &creator_device.provider(),
                    &creator_device.signer,
                    &key_packages,
                )
                .expect("adding filler members");
            group
                .merge_pending_commit(&creator_device.provider())
                .expect("merging an add commit");
        }

        let joiners: Vec<Device> = (1..real_count).map(Device::new).collect();
        let key_packages: Vec<Vec<u8>> = joiners
            .iter()
            .map(|device| device.key_package(suite))
            .collect();
        let added = group
            .add_members(
                &creator_device.provider(),
                &creator_device.signer,
                &key_packages,
            )
            .expect("adding the real members");
        group
            .merge_pending_commit(&creator_device.provider())
            .expect("merging the real members' add");
        let welcome = added.welcome.expect("an add commit carries a Welcome");

        let mut members = joiners.into_iter().map(|device| {
            let (group, _inviter) =
                Group::join(&device.provider(), &welcome, &config).expect("joining from Welcome");
            Member { device, group }
        });
        let receiver = members.next().expect("a group of two has a receiver");
        let third = members.next();
        let fixture = Fixture {
            creator: Member {
                device: creator_device,
                group,
            },
            receiver,
            third,
        };
        assert_eq!(fixture.creator.group.members().len(), size);
        fixture
    }

    /// The sender, the receiver, and the member that must only keep in step.
    fn roles(&mut self) -> (&mut Member, &mut Member, Option<&mut Member>) {
        match &mut self.third {
            Some(third) => (third, &mut self.receiver, Some(&mut self.creator)),
            None => (&mut self.creator, &mut self.receiver, None),
        }
    }

    /// Moves every real member to a new epoch by a commit of the receiver
    /// (which never sends in a benchmark), so each benchmark starts with
    /// fresh ratchets: a previous one may have run a sender's ratchet far
    /// past what a receiver accepts, or left the creator's handshake
    /// ratchet advanced by commits it cleared.
    fn new_epoch(&mut self) {
        let (sender, receiver, bystander) = self.roles();
        drop(receiver.update_for(std::iter::once(sender).chain(bystander)));
    }
}

/// Fixtures by suite (its number) and group size, built on first use so
/// that a filtered run builds only what it measures.
#[derive(Default)]
struct Fixtures {
    by_size: BTreeMap<(u16, usize), Fixture>,
}

impl Fixtures {
    /// The fixture for `suite` and `size`, moved to a fresh epoch for a new
    /// benchmark.
    fn fresh(&mut self, suite: Suite, size: usize) -> &mut Fixture {
        let fixture = self
            .by_size
            .entry((suite.code(), size))
            .or_insert_with(|| Fixture::build(suite, size));
        fixture.new_epoch();
        fixture
    }
}

/// Runs `routine` as the benchmark `group/suite kind/size`, with the
/// fixture made fresh once before criterion's first call (it calls the
/// closure once per warm-up round and per sample).
fn bench_size(
    group: &mut BenchmarkGroup<'_, WallTime>,
    fixtures: &mut Fixtures,
    (suite, size): (Suite, usize),
    mut routine: impl FnMut(&mut criterion::Bencher<'_>, &mut Fixture),
) {
    if size >= LARGE_GROUP {
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
    } else {
        group
            .sample_size(50)
            .sampling_mode(SamplingMode::Auto)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
    }
    let mut fresh = false;
    group.bench_function(BenchmarkId::new(suite.kind(), size), |bencher| {
        if !fresh {
            fixtures.fresh(suite, size);
            fresh = true;
        }
        let fixture = fixtures
            .by_size
            .get_mut(&(suite.code(), size))
            .expect("made fresh above");
        routine(bencher, fixture);
    });
}

/// One member encrypts a 256-byte application message.
fn encrypt(c: &mut Criterion, fixtures: &mut Fixtures) {
    let mut group = c.benchmark_group("encrypt");
    for case in cases(&GROUP_SIZES) {
        bench_size(&mut group, fixtures, case, |bencher, fixture| {
            let (sender, _, _) = fixture.roles();
            let provider = sender.device.provider();
            bencher.iter(|| {
                sender
                    .group
                    .encrypt(&provider, &sender.device.signer, black_box(&MESSAGE))
                    .expect("encrypting")
            });
        });
    }
    group.finish();
}

/// Another member processes one such message; messages are made, in order,
/// outside the timing.
fn decrypt(c: &mut Criterion, fixtures: &mut Fixtures) {
    let mut group = c.benchmark_group("decrypt");
    for case in cases(&GROUP_SIZES) {
        bench_size(&mut group, fixtures, case, |bencher, fixture| {
            let (sender, receiver, _) = fixture.roles();
            let sender_provider = sender.device.provider();
            let receiver_provider = receiver.device.provider();
            bencher.iter_batched(
                || {
                    sender
                        .group
                        .encrypt(&sender_provider, &sender.device.signer, &MESSAGE)
                        .expect("encrypting")
                },
                |message| {
                    let incoming = receiver
                        .group
                        .process(&receiver_provider, &message)
                        .expect("decrypting");
                    assert!(matches!(incoming, Incoming::Application { .. }));
                    incoming
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// The creator makes a self-update commit; clearing it afterwards is not
/// timed.
fn commit_create(c: &mut Criterion, fixtures: &mut Fixtures) {
    let mut group = c.benchmark_group("commit_create");
    for case in cases(&GROUP_SIZES) {
        bench_size(&mut group, fixtures, case, |bencher, fixture| {
            let creator = &mut fixture.creator;
            let provider = creator.device.provider();
            bencher.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    let start = Instant::now();
                    let commit = creator
                        .group
                        .self_update(&provider, &creator.device.signer)
                        .expect("creating a self-update");
                    timed += start.elapsed();
                    black_box(commit);
                    creator
                        .group
                        .clear_pending_commit(&provider)
                        .expect("clearing the self-update");
                }
                timed
            });
        });
    }
    group.finish();
}

/// The receiver processes a self-update commit from the sender. Each commit
/// is made, merged by its sender and processed by the third member outside
/// the timing, so every real member stays in the same epoch; the receiver
/// processes the commits in the order they were made.
fn commit_process(c: &mut Criterion, fixtures: &mut Fixtures) {
    let mut group = c.benchmark_group("commit_process");
    for case in cases(&GROUP_SIZES) {
        bench_size(&mut group, fixtures, case, |bencher, fixture| {
            let (sender, receiver, mut bystander) = fixture.roles();
            let receiver_provider = receiver.device.provider();
            bencher.iter_batched(
                || sender.update_for(bystander.as_deref_mut()).commit,
                |commit| {
                    let incoming = receiver
                        .group
                        .process(&receiver_provider, &commit)
                        .expect("processing the sender's commit");
                    assert!(matches!(incoming, Incoming::Commit { .. }));
                    incoming
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// The delivery service's work for one self-update commit from the sender:
/// load the group's stored public state, validate and merge the commit,
/// check the GroupInfo it comes with against the new state (kept for
/// members who must rejoin), serialise the new state (`commit_validate`);
/// and, for comparison, the
/// cleartext header check that was all it did before (`commit_header`).
/// Commits are made, merged and processed by the other real members outside
/// the timing, so the state stays in step with the group.
fn commit_validate(c: &mut Criterion, fixtures: &mut Fixtures) {
    for (name, full) in [("commit_validate", true), ("commit_header", false)] {
        let mut group = c.benchmark_group(name);
        for case in cases(&SERVER_GROUP_SIZES) {
            bench_size(&mut group, fixtures, case, |bencher, fixture| {
                let (sender, receiver, mut bystander) = fixture.roles();
                let sender_provider = sender.device.provider();
                let group_id = sender.group.id();
                let info = sender
                    .group
                    .group_info(&sender_provider, &sender.device.signer)
                    .expect("exporting the GroupInfo");
                let mut state = PublicState::observe(&group_id, &info)
                    .expect("tracking the group")
                    .to_bytes();
                bencher.iter_custom(|iterations| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iterations {
                        let output = sender.update_for(
                            std::iter::once(&mut *receiver).chain(bystander.as_deref_mut()),
                        );
                        let start = Instant::now();
                        if full {
                            let (valid, after) = PublicState::from_bytes(&group_id, &state)
                                .expect("loading")
                                .process_commit(black_box(&output.commit), &[], None)
                                .expect("validating the commit");
                            after
                                .check_group_info(black_box(&output.group_info), &valid.sender)
                                .expect("checking the GroupInfo");
                            state = after.to_bytes();
                            black_box(valid);
                        } else {
                            black_box(
                                umbra_mls::message_header(black_box(&output.commit))
                                    .expect("reading the header"),
                            );
                        }
                        timed += start.elapsed();
                    }
                    timed
                });
            });
        }
        group.finish();
    }
}

/// Every suite at every one of `sizes`.
fn cases(sizes: &[usize]) -> impl Iterator<Item = (Suite, usize)> + '_ {
    SUITES
        .into_iter()
        .flat_map(move |suite| sizes.iter().map(move |&size| (suite, size)))
}

fn mls(c: &mut Criterion) {
    let mut fixtures = Fixtures::default();
    encrypt(c, &mut fixtures);
    decrypt(c, &mut fixtures);
    commit_create(c, &mut fixtures);
    commit_process(c, &mut fixtures);
    commit_validate(c, &mut fixtures);
}

criterion_group!(benches, mls);
criterion_main!(benches);
