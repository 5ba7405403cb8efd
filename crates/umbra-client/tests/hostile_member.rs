//! A hostile group member against the real server and honest devices.
//!
//! Mallory is a test-only device that speaks the protocol directly (its own
//! TLS connection, its own MLS state through umbra-mls with the `hostile`
//! feature) and sends what an honest Umbra device never would. Alice and
//! Bob are real `Client`s. After each attack the group must go on working
//! for them, and each must see the truth.

mod common;

use std::sync::Arc;

use common::{Device, TestServer};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use umbra_client::{AccountId, ConversationId, ErrorCode, Event};
use umbra_mls::{Crypto, DeviceSigner, Group, GroupConfig, Provider};
use umbra_proto::frame::CommitSubmission;
use umbra_proto::{
    ClientFrame, ErrorReply, GroupId, Nonce, Push, Reply, Request, ServerMessage, decode_server,
    encode_client, register_signing_payload,
};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// The misbehaving device: a raw connection and its own MLS state.
struct Mallory {
    ws: Ws,
    next_id: u64,
    account: AccountId,
    signer: DeviceSigner,
    crypto: Crypto,
    db: rusqlite::Connection,
    /// Set on a device other than its account's first.
    certificate: Option<umbra_mls::DeviceCertificate>,
    /// The account's device log, kept by the device that wrote it.
    log: Option<umbra_mls::DeviceLog>,
}

async fn connect(activation: &umbra_proto::ActivationString) -> Ws {
    let tls = umbra_client::pinned_tls_config(activation.pin).unwrap();
    let tcp = tokio::net::TcpStream::connect(&activation.address)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("umbra.invalid").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{}/", activation.address), tls)
        .await
        .unwrap();
    ws
}

impl Mallory {
    /// A second device of Mallory's account: added to its device log (the
    /// first entry too), logged in with its own key, its packages carrying
    /// its certificate.
    async fn second_device(&mut self, server: &TestServer) -> Mallory {
        use umbra_mls::{DeviceCertificate, DeviceLog, FIRST_DEVICE};
        let d2 = DeviceSigner::from_secret(&[67; 32]);
        let mut log = DeviceLog::new(self.account.clone(), self.signer.identity_key());
        let first = log.first_entry(&self.signer, "phone", 1);
        log.append(first.clone(), None).unwrap();
        let add = log.add_entry(&self.signer, (FIRST_DEVICE, &self.signer), &d2, "laptop", 2);
        for entry in [first, add.clone()] {
            assert_eq!(
                self.call(Request::AppendDeviceEntry { entry }).await,
                Ok(Reply::Done)
            );
        }
        log.append(add.clone(), None).unwrap();
        self.log = Some(log);
        let mut db = rusqlite::Connection::open_in_memory().unwrap();
        umbra_mls::init_storage(&mut db).unwrap();
        let mut second = Mallory {
            ws: connect(&server.activation().await).await,
            next_id: 1,
            account: self.account.clone(),
            signer: d2,
            crypto: Crypto::default(),
            db,
            certificate: Some(DeviceCertificate {
                account_key: self.signer.identity_key(),
                entry: add,
            }),
            log: None,
        };
        let nonce = second.hello().await;
        let signature = second
            .signer
            .sign_payload(&umbra_proto::login_signing_payload(&nonce, &second.account));
        let login = Request::Login {
            account_id: second.account.clone(),
            signature,
            device: umbra_proto::DeviceId(2),
        };
        assert!(matches!(
            second.call(login).await,
            Ok(Reply::LoggedIn { .. })
        ));
        second
    }

    async fn activate(server: &TestServer) -> Mallory {
        let activation = server.activation().await;
        let ws = connect(&activation).await;
        let mut db = rusqlite::Connection::open_in_memory().unwrap();
        umbra_mls::init_storage(&mut db).unwrap();
        let mut mallory = Mallory {
            ws,
            next_id: 1,
            account: AccountId::parse("AAAAAAAA").unwrap(),
            signer: DeviceSigner::from_secret(&[66; 32]),
            crypto: Crypto::default(),
            db,
            certificate: None,
            log: None,
        };
        let nonce = mallory.hello().await;
        mallory.account = mallory.register(activation.code, &nonce).await;
        let key_packages = (0..4)
            .map(|_| {
                umbra_mls::new_key_package(
                    &mallory.provider(),
                    &mallory.signer,
                    &mallory.account,
                    Default::default(),
                    false,
                )
                .unwrap()
            })
            .collect();
        mallory
            .call(Request::UploadKeyPackages {
                key_packages,
                last_resort: None,
            })
            .await
            .unwrap();
        mallory
    }

    /// Uploads one-time KeyPackages of this device (with its certificate,
    /// if it has one).
    async fn upload_key_packages(&mut self, count: usize) {
        let key_packages = (0..count)
            .map(|_| {
                umbra_mls::new_device_key_package(
                    &self.provider(),
                    &self.signer,
                    &self.account,
                    Default::default(),
                    false,
                    self.certificate.as_ref(),
                )
                .unwrap()
            })
            .collect();
        assert!(matches!(
            self.call(Request::UploadKeyPackages {
                key_packages,
                last_resort: None,
            })
            .await,
            Ok(Reply::KeyPackageCount { .. })
        ));
    }

    /// The next delivery of `kind` pushed to this device.
    async fn next_of(&mut self, kind: umbra_proto::DeliveryKind) -> umbra_proto::frame::Delivery {
        loop {
            if let ServerMessage::Push(Push::Delivery(delivery)) = self.next().await
                && delivery.kind == kind
            {
                return delivery;
            }
        }
    }

    fn provider(&self) -> Provider<'_> {
        Provider::new(&self.crypto, &self.db)
    }

    async fn register(&mut self, code: umbra_proto::ActivationCode, nonce: &Nonce) -> AccountId {
        let identity_key = self.signer.identity_key();
        let signature = self
            .signer
            .sign_payload(&register_signing_payload(nonce, &identity_key));
        match self
            .call(Request::Register {
                activation_code: code,
                identity_key,
                signature,
            })
            .await
        {
            Ok(Reply::Registered { account_id, .. }) => account_id,
            other => panic!("registration failed: {other:?}"),
        }
    }

    /// The nonce of the server's Hello, the first frame on a connection.
    async fn hello(&mut self) -> Nonce {
        loop {
            if let ServerMessage::Push(Push::Hello { nonce, .. }) = self.next().await {
                return nonce;
            }
        }
    }

    async fn next(&mut self) -> ServerMessage {
        loop {
            match self.ws.next().await.expect("connection closed").unwrap() {
                Message::Binary(bytes) => return decode_server(&bytes).unwrap(),
                _ => continue,
            }
        }
    }

    /// Sends raw frame bytes and returns the answer to request `id`.
    async fn exchange(&mut self, id: u64, bytes: Vec<u8>) -> Result<Reply, ErrorReply> {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
        loop {
            if let ServerMessage::Response { id: got, result } = self.next().await
                && got == id
            {
                return result;
            }
        }
    }

    fn frame(&mut self, request: Request) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        (id, encode_client(&ClientFrame { id, request }))
    }

    async fn call(&mut self, request: Request) -> Result<Reply, ErrorReply> {
        let (id, bytes) = self.frame(request);
        self.exchange(id, bytes).await
    }

    async fn key_package(&mut self, account: &AccountId) -> Vec<u8> {
        match self
            .call(Request::FetchKeyPackage {
                account_id: account.clone(),
                device: umbra_proto::DeviceId::FIRST,
                suites: vec![umbra_mls::Suite::default().code()],
            })
            .await
        {
            Ok(Reply::KeyPackage { key_package, .. }) => key_package,
            other => panic!("no KeyPackage for {account}: {other:?}"),
        }
    }

    /// Creates a group (timer off) with these honest members in it;
    /// returns it and the commit that added them.
    async fn create_group(&mut self, members: &[AccountId]) -> (Group, Vec<u8>) {
        let mut group = Group::create_as_device(
            &self.provider(),
            &self.signer,
            &self.account,
            &GroupConfig::default(),
            0,
            self.certificate.as_ref(),
        )
        .unwrap();
        let group_info = group.group_info(&self.provider(), &self.signer).unwrap();
        let group_id = GroupId::new(group.id()).unwrap();
        self.call(Request::CreateGroup {
            group_id,
            group_info,
            delivery_key: None,
        })
        .await
        .unwrap();
        let mut key_packages = Vec::new();
        for member in members {
            key_packages.push(self.key_package(member).await);
        }
        let output = group
            .add_members(&self.provider(), &self.signer, &key_packages)
            .unwrap();
        let accepted = self
            .submit(
                &group,
                output.epoch,
                output.commit.clone(),
                output.welcome,
                output.group_info,
            )
            .await;
        assert_eq!(accepted, Ok(Reply::CommitAccepted { epoch: 1 }));
        group.merge_pending_commit(&self.provider()).unwrap();
        (group, output.commit)
    }

    async fn submit(
        &mut self,
        group: &Group,
        epoch: u64,
        commit: Vec<u8>,
        welcome: Option<Vec<u8>>,
        group_info: Vec<u8>,
    ) -> Result<Reply, ErrorReply> {
        self.call(Request::SendCommit(CommitSubmission {
            group_id: GroupId::new(group.id()).unwrap(),
            epoch,
            commit,
            welcome,
            group_info,
            delivery_key: None,
        }))
        .await
    }

    async fn propose(&mut self, group: &Group, proposal: Vec<u8>) -> Result<Reply, ErrorReply> {
        self.call(Request::SendMessage {
            group_id: GroupId::new(group.id()).unwrap(),
            message: proposal,
            kind: umbra_proto::DeliveryKind::Proposal,
            ttl_seconds: 0,
        })
        .await
    }
}

/// Mallory asks Alice to be a contact, and Alice accepts.
async fn alice_accepts(alice: &mut Device, mallory: &mut Mallory) {
    mallory
        .call(Request::SendContactRequest { to: alice.id() })
        .await
        .unwrap();
    alice
        .wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;
    alice.client.accept_contact(&mallory.account).await.unwrap();
}

/// Waits until `device` has joined `conversation`.
async fn joined(device: &mut Device, conversation: &ConversationId) {
    let wanted = conversation.clone();
    device
        .wait_for(|e| match e {
            Event::ConversationStarted { conversation } if conversation.id == wanted => Some(()),
            _ => None,
        })
        .await;
}

/// Mallory, and Alice and Bob in a group Mallory made.
struct Scene {
    _server: TestServer,
    mallory: Mallory,
    group: Group,
    /// Mallory's commit that added Alice and Bob (epoch 0).
    first_commit: Vec<u8>,
    alice: Device,
    bob: Device,
    conversation: ConversationId,
}

async fn scene() -> Scene {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut mallory = Mallory::activate(&server).await;
    for device in [&mut alice, &mut bob] {
        mallory
            .call(Request::SendContactRequest { to: device.id() })
            .await
            .unwrap();
        device
            .wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
            .await;
        device
            .client
            .accept_contact(&mallory.account)
            .await
            .unwrap();
    }
    let (group, first_commit) = mallory.create_group(&[alice.id(), bob.id()]).await;
    let conversation = ConversationId::from_group(&group.id());
    for device in [&mut alice, &mut bob] {
        let wanted = conversation.clone();
        device
            .wait_for(|e| match e {
                Event::ConversationStarted { conversation } if conversation.id == wanted => {
                    Some(())
                }
                _ => None,
            })
            .await;
    }
    Scene {
        _server: server,
        mallory,
        group,
        first_commit,
        alice,
        bob,
        conversation,
    }
}

impl Scene {
    /// A valid key update from Mallory for the group's epoch as Mallory
    /// knows it, forgotten locally (Mallory only ever sends it).
    fn mallory_update(&mut self) -> umbra_mls::CommitOutput {
        let provider = self.mallory.provider();
        let output = self
            .group
            .self_update(&provider, &self.mallory.signer)
            .unwrap();
        self.group.clear_pending_commit(&provider).unwrap();
        output
    }

    /// The group still works for the honest members: Alice commits (a key
    /// update), and a message from each reaches the other.
    async fn honest_members_carry_on(&mut self, label: &str) {
        // Alice's key update in every conversation (this group and her
        // one-to-one with Mallory) is accepted.
        self.alice.client.update_keys().await.unwrap();
        let text = format!("{label}: from alice");
        self.alice
            .client
            .send_text(&self.conversation, &text)
            .await
            .unwrap();
        assert_eq!(self.bob.next_text().await, (self.alice.id(), text));
        let text = format!("{label}: from bob");
        self.bob
            .client
            .send_text(&self.conversation, &text)
            .await
            .unwrap();
        assert_eq!(self.alice.next_text().await, (self.bob.id(), text));
        for device in [&self.alice, &self.bob] {
            let seen = device.client.conversation(&self.conversation).unwrap();
            let mut members = seen.members.clone();
            members.sort();
            let mut expected = vec![self.alice.id(), self.bob.id(), self.mallory.account.clone()];
            expected.sort();
            assert_eq!(members, expected, "{label}: everyone is still in the group");
            assert_eq!(seen.disappear_after, 0, "{label}: the timer is unchanged");
        }
    }
}

#[tokio::test]
async fn a_garbage_commit_with_a_valid_header_is_refused_and_changes_nothing() {
    let mut scene = scene().await;
    let output = scene.mallory_update();
    let mut garbage = output.commit.clone();
    // Inside the signed content: the header (group, epoch, type) still
    // parses, the body no longer matches its signature.
    let middle = garbage.len() / 2;
    garbage[middle] ^= 0x55;
    assert_eq!(
        umbra_mls::message_header(&garbage).unwrap().epoch,
        output.epoch,
        "the header is intact"
    );
    let refused = scene
        .mallory
        .submit(&scene.group, output.epoch, garbage, None, output.group_info)
        .await
        .unwrap_err();
    assert_eq!(
        refused.code,
        ErrorCode::InvalidCommit,
        "{}",
        refused.message
    );
    scene
        .honest_members_carry_on("after a garbage commit")
        .await;
}

#[tokio::test]
async fn membership_declared_by_the_committer_is_not_believed() {
    let mut scene = scene().await;
    // A valid key update, with the retired `removed` field (tag 6 of
    // SendCommit) naming Bob appended to the frame: protobuf merges a
    // repeated embedded message, so a server that still read the field
    // would stop routing the group's traffic to Bob.
    let output = scene.mallory_update();
    let (id, mut bytes) = scene.mallory.frame(Request::SendCommit(CommitSubmission {
        group_id: GroupId::new(scene.group.id()).unwrap(),
        epoch: output.epoch,
        commit: output.commit,
        welcome: None,
        group_info: output.group_info,
        delivery_key: None,
    }));
    let mut lie = Vec::new();
    prost::encoding::string::encode(6, &scene.bob.id().to_string(), &mut lie);
    let mut field = Vec::new();
    prost::encoding::bytes::encode(17, &lie, &mut field);
    bytes.extend_from_slice(&field);
    assert_eq!(
        scene.mallory.exchange(id, bytes).await,
        Ok(Reply::CommitAccepted { epoch: 2 })
    );
    scene.honest_members_carry_on("after a lying commit").await;
}

/// Mallory sends the proposal `make` builds; the server refuses it with
/// `INVALID_PROPOSAL`, and the group goes on unchanged.
async fn proposal_is_refused(
    label: &str,
    make: impl FnOnce(&mut Group, &Provider<'_>, &DeviceSigner, &AccountId) -> Vec<u8>,
) {
    let mut scene = scene().await;
    let bob = scene.bob.id();
    let provider = scene.mallory.provider();
    let proposal = make(&mut scene.group, &provider, &scene.mallory.signer, &bob);
    scene.group.clear_pending_proposals(&provider).unwrap();
    let refused = scene
        .mallory
        .propose(&scene.group, proposal)
        .await
        .unwrap_err();
    assert_eq!(
        refused.code,
        ErrorCode::InvalidProposal,
        "{}",
        refused.message
    );
    scene.honest_members_carry_on(label).await;
}

#[tokio::test]
async fn a_proposal_to_remove_another_member_is_refused() {
    proposal_is_refused(
        "after a proposal to remove Bob",
        |group, provider, signer, bob| group.propose_removal(provider, signer, bob).unwrap(),
    )
    .await;
}

#[tokio::test]
async fn a_proposal_to_change_the_timer_is_refused() {
    proposal_is_refused("after a timer proposal", |group, provider, signer, _| {
        group
            .propose_disappear_after(provider, signer, 3600)
            .unwrap()
    })
    .await;
}

#[tokio::test]
async fn a_resubmitted_old_commit_changes_nothing() {
    let mut scene = scene().await;
    // Alice moves the group on; Mallory then replays an update made for
    // the epoch Alice's commit took, and its own first commit again.
    scene.alice.client.update_keys().await.unwrap();
    let old = scene.mallory_update();
    let first = scene.first_commit.clone();
    assert_eq!(
        scene
            .mallory
            .submit(&scene.group, 0, first, None, Vec::new())
            .await,
        Ok(Reply::CommitAccepted { epoch: 1 }),
        "the commit accepted for epoch 0 is recognised, not applied again"
    );
    let refused = scene
        .mallory
        .submit(
            &scene.group,
            old.epoch,
            old.commit.clone(),
            None,
            old.group_info.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code, refused.current_epoch),
        (ErrorCode::StaleEpoch, 2)
    );
    assert_eq!(
        scene
            .mallory
            .submit(&scene.group, old.epoch, old.commit, None, old.group_info)
            .await
            .unwrap_err()
            .code,
        ErrorCode::StaleEpoch,
        "a replay is refused every time"
    );
    scene
        .honest_members_carry_on("after a replayed commit")
        .await;
}

#[tokio::test]
async fn a_commit_that_gives_a_leaf_another_account_is_refused() {
    let mut scene = scene().await;
    // Carol is Mallory's contact but not in the group. Mallory's key
    // update renames its own leaf to Carol: a server that believed the
    // tree's credentials unchecked would route the group's traffic to her.
    let mut carol = Device::activate(&scene._server).await;
    scene
        .mallory
        .call(Request::SendContactRequest { to: carol.id() })
        .await
        .unwrap();
    carol
        .wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;
    carol
        .client
        .accept_contact(&scene.mallory.account)
        .await
        .unwrap();
    let provider = scene.mallory.provider();
    let output = scene
        .group
        .update_as(&provider, &scene.mallory.signer, &carol.id())
        .unwrap();
    scene.group.clear_pending_commit(&provider).unwrap();
    let refused = scene
        .mallory
        .submit(
            &scene.group,
            output.epoch,
            output.commit,
            None,
            output.group_info,
        )
        .await
        .unwrap_err();
    assert_eq!(
        refused.code,
        ErrorCode::InvalidCommit,
        "{}",
        refused.message
    );
    scene.honest_members_carry_on("after a renamed leaf").await;
}

#[tokio::test]
async fn a_member_proposes_leaving_once_per_epoch_and_is_removed() {
    let mut scene = scene().await;
    // Alice and Bob are offline, so no commit can end the epoch between
    // Mallory's two proposals.
    scene.alice.client.disconnect();
    scene.bob.client.disconnect();
    let provider = scene.mallory.provider();
    let leaving = scene.group.leave(&provider, &scene.mallory.signer).unwrap();
    assert!(matches!(
        scene.mallory.propose(&scene.group, leaving.clone()).await,
        Ok(Reply::Accepted { .. })
    ));
    // Each proposal stored is replayed into every commit's validation in
    // that epoch, so one member gets one.
    let again = scene
        .mallory
        .propose(&scene.group, leaving)
        .await
        .unwrap_err();
    assert_eq!(again.code, ErrorCode::InvalidProposal, "{}", again.message);
    // Back online, an honest device commits the departure; both see
    // Mallory gone and go on talking.
    scene.alice.client.connect().await.unwrap();
    scene.bob.client.connect().await.unwrap();
    let mut remaining = vec![scene.alice.id(), scene.bob.id()];
    remaining.sort();
    for device in [&mut scene.alice, &mut scene.bob] {
        let (wanted, members) = (scene.conversation.clone(), remaining.clone());
        device
            .wait_for(|e| match e {
                Event::ConversationChanged { conversation }
                    if conversation.id == wanted && {
                        let mut seen = conversation.members.clone();
                        seen.sort();
                        seen == members
                    } =>
                {
                    Some(())
                }
                _ => None,
            })
            .await;
    }
    scene
        .alice
        .client
        .send_text(&scene.conversation, "mallory left")
        .await
        .unwrap();
    assert_eq!(
        scene.bob.next_text().await,
        (scene.alice.id(), "mallory left".to_owned())
    );
}

#[tokio::test]
async fn removing_and_adding_a_member_in_one_commit_is_refused() {
    let mut scene = scene().await;
    // Bob would be cut off (his device is told it was removed) while the
    // routing and everyone else still counted him in.
    let bob = scene.bob.id();
    let key_package = scene.mallory.key_package(&bob).await;
    let provider = scene.mallory.provider();
    let output = scene
        .group
        .remove_and_add(&provider, &scene.mallory.signer, &bob, &key_package)
        .unwrap();
    scene.group.clear_pending_commit(&provider).unwrap();
    let refused = scene
        .mallory
        .submit(
            &scene.group,
            output.epoch,
            output.commit,
            output.welcome,
            output.group_info,
        )
        .await
        .unwrap_err();
    assert_eq!(
        refused.code,
        ErrorCode::InvalidCommit,
        "{}",
        refused.message
    );
    scene
        .honest_members_carry_on("after a remove-and-add")
        .await;
}

/// A contact's device other than its first stands for the contact's account
/// key: its Welcome is taken, the account key (from its certificate) is the
/// one pinned, not the device's, so the contact's device list verifies, and
/// the conversation works both ways.
#[tokio::test]
async fn a_contacts_second_device_stands_for_their_account_key() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut mallory = Mallory::activate(&server).await;
    alice_accepts(&mut alice, &mut mallory).await;
    let mut laptop = mallory.second_device(&server).await;
    let (group, _) = laptop.create_group(&[alice.id()]).await;
    let conversation = ConversationId::from_group(&group.id());
    joined(&mut alice, &conversation).await;
    let devices = alice
        .client
        .contact_devices(&mallory.account)
        .await
        .unwrap();
    assert_eq!(
        devices.iter().map(|d| d.id.0).collect::<Vec<_>>(),
        [1, 2],
        "the device list verifies under the key pinned from the certificate"
    );
    let contact = alice
        .client
        .contacts()
        .unwrap()
        .into_iter()
        .find(|c| c.account == mallory.account)
        .unwrap();
    assert!(!contact.key_changed, "no key change was seen");
    alice
        .client
        .send_text(&conversation, "to the laptop")
        .await
        .unwrap();
    let mut group = group;
    let delivery = loop {
        if let ServerMessage::Push(Push::Delivery(delivery)) = laptop.next().await
            && delivery.kind == umbra_proto::DeliveryKind::Application
        {
            break delivery;
        }
    };
    let provider = laptop.provider();
    match group.process(&provider, &delivery.payload).unwrap() {
        umbra_mls::Incoming::Application { sender, plaintext } => {
            // The message envelope carries the text.
            assert_eq!(sender, alice.id());
            assert!(
                plaintext.windows(13).any(|w| w == b"to the laptop"),
                "{plaintext:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A contact's device removed from its account is committed out of the
/// groups it was in by another member, on the account's own signed remove
/// entry, and the members are shown who removed it; the account stays a
/// member through its other device.
#[tokio::test]
async fn a_removed_device_is_committed_out_of_its_groups() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut mallory = Mallory::activate(&server).await;
    alice_accepts(&mut alice, &mut mallory).await;
    // Mallory's laptop makes a group of Alice, itself and Mallory's phone.
    let mut laptop = mallory.second_device(&server).await;
    let (group, _) = laptop
        .create_group(&[alice.id(), mallory.account.clone()])
        .await;
    let conversation = ConversationId::from_group(&group.id());
    joined(&mut alice, &conversation).await;
    let welcome = loop {
        if let ServerMessage::Push(Push::Delivery(delivery)) = mallory.next().await
            && delivery.kind == umbra_proto::DeliveryKind::Welcome
        {
            break delivery;
        }
    };
    let (mut phones, _) = Group::join(
        &mallory.provider(),
        &welcome.payload,
        &GroupConfig::default(),
    )
    .unwrap();
    let laptop_leaf =
        umbra_proto::DeviceAddr::new(mallory.account.clone(), umbra_proto::DeviceId(2));
    assert!(phones.members().iter().any(|m| m.address() == laptop_leaf));

    // The phone removes the laptop from the account.
    let remove = mallory.log.as_ref().unwrap().remove_entry(
        &mallory.signer,
        (umbra_mls::FIRST_DEVICE, &mallory.signer),
        umbra_proto::DeviceId(2),
        3,
    );
    assert_eq!(
        mallory
            .call(Request::AppendDeviceEntry { entry: remove })
            .await,
        Ok(Reply::Done)
    );

    // Alice commits the laptop's leaf out; the phone applies her commit.
    let commit = loop {
        if let ServerMessage::Push(Push::Delivery(delivery)) = mallory.next().await
            && delivery.kind == umbra_proto::DeliveryKind::Commit
        {
            break delivery;
        }
    };
    assert_eq!(
        commit.sender, None,
        "MLS names the committer, the server does not"
    );
    let provider = mallory.provider();
    assert!(matches!(
        phones.process(&provider, &commit.payload).unwrap(),
        umbra_mls::Incoming::Commit { .. }
    ));
    let mut left: Vec<_> = phones.members().iter().map(|m| m.address()).collect();
    left.sort();
    let mut expected = vec![
        umbra_proto::DeviceAddr::first(alice.id()),
        umbra_proto::DeviceAddr::first(mallory.account.clone()),
    ];
    expected.sort();
    assert_eq!(
        left, expected,
        "the laptop's leaf is gone, the phone's stays"
    );
    let shown = alice
        .client
        .history(&conversation, 100)
        .unwrap()
        .iter()
        .any(|m| {
            m.direction == umbra_client::Direction::System
                && m.body
                    .contains("removed their device 2 (from their device 1)")
        });
    assert!(shown, "Alice is shown who removed which device");
    // And who took its leaf out (once Alice has the server's answer to
    // her commit, which may come after the phone got it).
    let committed = format!("{} removed {}'s device 2", alice.id(), mallory.account);
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while !alice
        .client
        .history(&conversation, 100)
        .unwrap()
        .iter()
        .any(|m| m.direction == umbra_client::Direction::System && m.body == committed)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Alice is not shown that she took the leaf out"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let members = alice.client.conversation(&conversation).unwrap().members;
    assert!(members.contains(&mallory.account), "Mallory stays a member");

    // Alice writes after the removal. The phone reads it; the laptop,
    // handed the message (and then the commit that removed it) by a server
    // that kept them for it, reads nothing.
    alice
        .client
        .send_text(&conversation, "after the laptop left")
        .await
        .unwrap();
    let message = mallory
        .next_of(umbra_proto::DeliveryKind::Application)
        .await;
    assert!(matches!(
        phones.process(&mallory.provider(), &message.payload).unwrap(),
        umbra_mls::Incoming::Application { ref sender, .. } if *sender == alice.id()
    ));
    let mut removed = group;
    let removed_provider = laptop.provider();
    assert!(
        removed
            .process(&removed_provider, &message.payload)
            .is_err(),
        "a message of the epoch after its removal"
    );
    assert!(matches!(
        removed.process(&removed_provider, &commit.payload).unwrap(),
        umbra_mls::Incoming::Commit {
            removed_self: true,
            ..
        }
    ));
    assert!(
        removed
            .process(&removed_provider, &message.payload)
            .is_err(),
        "the commit that removed it gives it no key to the next epoch"
    );
}

/// A group gets a leaf for every current device of a member account: Alice
/// adds Mallory, whose log lists a phone and a laptop, and both join.
#[tokio::test]
async fn adding_an_account_adds_each_of_its_devices() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut mallory = Mallory::activate(&server).await;
    alice_accepts(&mut alice, &mut mallory).await;
    let mut laptop = mallory.second_device(&server).await;
    laptop.upload_key_packages(2).await;

    let conversation = alice
        .client
        .create_group("both devices", std::slice::from_ref(&mallory.account))
        .await
        .unwrap();
    let config = GroupConfig::default();
    let phone_welcome = mallory.next_of(umbra_proto::DeliveryKind::Welcome).await;
    let laptop_welcome = laptop.next_of(umbra_proto::DeliveryKind::Welcome).await;
    let (phones, _) = Group::join(&mallory.provider(), &phone_welcome.payload, &config).unwrap();
    let (mut laptops, _) =
        Group::join(&laptop.provider(), &laptop_welcome.payload, &config).unwrap();
    let mut leaves: Vec<_> = phones.members().iter().map(|m| m.address()).collect();
    leaves.sort();
    let mut expected = vec![
        umbra_proto::DeviceAddr::first(alice.id()),
        umbra_proto::DeviceAddr::first(mallory.account.clone()),
        umbra_proto::DeviceAddr::new(mallory.account.clone(), umbra_proto::DeviceId(2)),
    ];
    expected.sort();
    assert_eq!(leaves, expected);

    // Alice's message reaches the laptop too.
    alice
        .client
        .send_text(&conversation, "to both")
        .await
        .unwrap();
    // (The group's name comes first.)
    loop {
        let delivery = laptop.next_of(umbra_proto::DeliveryKind::Application).await;
        let provider = laptop.provider();
        match laptops.process(&provider, &delivery.payload).unwrap() {
            umbra_mls::Incoming::Application { plaintext, sender } => {
                assert_eq!(sender, alice.id());
                if plaintext.windows(7).any(|w| w == b"to both") {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A device removal the account did not sign (here a server's own, under
/// a key it made up) only shows what the server says: nobody commits the
/// device's leaf out.
#[tokio::test]
async fn a_device_removal_the_account_did_not_sign_removes_nothing() {
    use umbra_store::{Groups as _, Mailboxes as _};
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut mallory = Mallory::activate(&server).await;
    alice_accepts(&mut alice, &mut mallory).await;
    let mut laptop = mallory.second_device(&server).await;
    let (group, _) = laptop.create_group(&[alice.id()]).await;
    let conversation = ConversationId::from_group(&group.id());
    joined(&mut alice, &conversation).await;

    // The server's forged remove entry for the laptop.
    let forger = DeviceSigner::from_secret(&[99; 32]);
    let mut log = umbra_mls::DeviceLog::new(mallory.account.clone(), forger.identity_key());
    log.append(log.first_entry(&forger, "phone", 1), None)
        .unwrap();
    let stand_in = DeviceSigner::from_secret(&[98; 32]);
    let add = log.add_entry(
        &forger,
        (umbra_mls::FIRST_DEVICE, &forger),
        &stand_in,
        "x",
        2,
    );
    log.append(add, None).unwrap();
    let forged = log.remove_entry(
        &forger,
        (umbra_mls::FIRST_DEVICE, &forger),
        umbra_proto::DeviceId(2),
        3,
    );
    let mallory_id = mallory.account.clone();
    drop((mallory, laptop));
    let group_id = GroupId::new(group.id()).unwrap();
    let (data, address, store, dir) = server.seize();
    let notice = umbra_store::Notice {
        recipient: alice.id(),
        device: None,
        sender: mallory_id,
        kind: umbra_proto::DeliveryKind::DeviceRemoved,
        group_id: Some(group_id.clone()),
        payload: forged.encode(),
    };
    let now = common::now();
    store.notice(notice, now, now + 3600).await.unwrap();
    drop(store);
    let server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    alice.client.sync().await.unwrap();
    let shown = |alice: &Device| {
        alice
            .client
            .history(&conversation, 100)
            .unwrap()
            .iter()
            .any(|m| {
                m.direction == umbra_client::Direction::System
                    && m.body.contains("The server reports that")
                    && m.body.contains("removed their device 2")
            })
    };
    assert!(shown(&alice), "only the server's word is shown");
    // A commit would have gone out by now (it follows the delivery at
    // once, before the next request on the connection is answered).
    alice
        .client
        .send_text(&conversation, "still here")
        .await
        .unwrap();
    let (_, _, store, _dir2) = server.seize();
    let state = store.group(&group_id).await.unwrap().unwrap();
    assert!(
        state
            .members
            .iter()
            .any(|leaf| leaf.device == umbra_proto::DeviceId(2)),
        "the laptop's leaf stays: {:?}",
        state.members
    );
    drop(dir);
}

#[tokio::test]
async fn a_message_of_an_epoch_the_group_left_is_refused_for_its_sender_to_send_again() {
    let mut scene = scene().await;
    // Alice's key update moves the group on; Mallory has not applied it.
    scene.alice.client.update_keys().await.unwrap();
    let epoch = scene.group.epoch();
    let stale = {
        let provider = scene.mallory.provider();
        let content = umbra_proto::content::Content {
            message_id: Some([7; 16]),
            body: umbra_proto::content::Body::Text("from the old epoch".into()),
            disappear_after: 0,
            sent_at_ms: 0,
        };
        scene
            .group
            .encrypt(&provider, &scene.mallory.signer, &content.encode())
            .unwrap()
    };
    let refused = scene
        .mallory
        .call(Request::SendMessage {
            group_id: GroupId::new(scene.group.id()).unwrap(),
            message: stale,
            kind: umbra_proto::DeliveryKind::Application,
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code, refused.current_epoch),
        (ErrorCode::StaleEpoch, epoch + 1),
        "{refused:?}"
    );
    scene.honest_members_carry_on("after the refusal").await;
    let got_it = scene
        .bob
        .client
        .history(&scene.conversation, 100)
        .unwrap()
        .iter()
        .any(|m| m.body == "from the old epoch");
    assert!(!got_it, "nothing of the refused message was delivered");
}

#[tokio::test]
async fn a_member_cannot_hide_a_text_under_another_texts_id() {
    let mut scene = scene().await;
    scene
        .alice
        .client
        .send_text(&scene.conversation, "alice's words")
        .await
        .unwrap();
    assert_eq!(scene.bob.next_text().await.1, "alice's words");
    // Mallory reads the text's ID and sends her own text under it.
    let delivery = scene
        .mallory
        .next_of(umbra_proto::DeliveryKind::Application)
        .await;
    let uid = {
        let provider = scene.mallory.provider();
        match scene.group.process(&provider, &delivery.payload).unwrap() {
            umbra_mls::Incoming::Application { plaintext, .. } => {
                umbra_proto::content::Content::decode(&plaintext)
                    .unwrap()
                    .message_id
                    .unwrap()
            }
            other => panic!("{other:?}"),
        }
    };
    let forged = {
        let provider = scene.mallory.provider();
        let content = umbra_proto::content::Content {
            message_id: Some(uid),
            body: umbra_proto::content::Body::Text("mallory's words".into()),
            disappear_after: 0,
            sent_at_ms: 0,
        };
        scene
            .group
            .encrypt(&provider, &scene.mallory.signer, &content.encode())
            .unwrap()
    };
    scene
        .mallory
        .call(Request::SendMessage {
            group_id: GroupId::new(scene.group.id()).unwrap(),
            message: forged,
            kind: umbra_proto::DeliveryKind::Application,
            ttl_seconds: 0,
        })
        .await
        .unwrap();
    // Bob shows it, from Mallory: an ID is no one's to take.
    assert_eq!(
        scene.bob.next_text().await,
        (scene.mallory.account.clone(), "mallory's words".to_owned())
    );
}
