//! A real server on 127.0.0.1 (plain WebSocket, loopback only) and a raw
//! protocol client, for tests that send what no well-behaved device would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use umbra_mls::DeviceSigner;
use umbra_proto::{
    AccountId, ActivationCode, ClientFrame, ErrorCode, ErrorReply, Nonce, Push, Reply, Request,
    ServerMessage, decode_server, encode_client, login_signing_payload, register_signing_payload,
};
use umbra_server::{Config, ServerOptions};

pub type Ws = WebSocketStream<TcpStream>;

pub struct Server {
    pub address: std::net::SocketAddr,
    pub data: tempfile::TempDir,
    pub shutdown: CancellationToken,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    /// A server whose configuration `adjust` changed first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Server {
        let data = tempfile::tempdir().unwrap();
        umbra_server::init(data.path(), "127.0.0.1:0").unwrap();
        Server::start_on(data, adjust).await
    }

    /// A server on a data directory that exists already.
    pub async fn start_on(data: tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> Server {
        let mut config = Config::load(data.path()).unwrap();
        config.tls = false; // loopback only: lets the test speak raw WebSocket
        adjust(&mut config);
        drop(umbra_server::open_store(data.path(), &config).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(umbra_server::run(
            config,
            data.path().to_owned(),
            listener,
            shutdown.clone(),
            ServerOptions::default(),
        ));
        Server {
            address,
            data,
            shutdown,
        }
    }

    pub async fn code(&self) -> ActivationCode {
        let config = Config::load(self.data.path()).unwrap();
        let mut strings =
            umbra_server::admin::issue_codes(self.data.path(), &config, 30, 1, 1_800_000_000)
                .await
                .unwrap();
        strings.pop().unwrap().code
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct Raw {
    pub ws: Ws,
    pub nonce: Nonce,
    pub next_id: u64,
}

impl Raw {
    pub async fn connect(server: &Server) -> Raw {
        Raw::connect_from(server, [127, 0, 0, 1].into()).await
    }

    /// Connects from `source` (any loopback address), reads Hello.
    pub async fn connect_from(server: &Server, source: IpAddr) -> Raw {
        let mut raw = Raw::open_from(server, source).await;
        match raw.next().await {
            Some(ServerMessage::Push(Push::Hello { nonce, .. })) => raw.nonce = nonce,
            other => panic!("expected Hello, got {other:?}"),
        }
        raw
    }

    /// Connects from `source` without reading anything.
    pub async fn open_from(server: &Server, source: IpAddr) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let tcp = socket.connect(server.address).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://{}/", server.address), tcp)
            .await
            .unwrap();
        Raw {
            ws,
            nonce: Nonce::from_bytes([0; 32]),
            next_id: 1,
        }
    }

    pub async fn next(&mut self) -> Option<ServerMessage> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Binary(bytes)) => return Some(decode_server(&bytes).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// The next response (skipping pushes).
    pub async fn response(&mut self) -> Option<(u64, Result<Reply, ErrorReply>)> {
        loop {
            match self.next().await? {
                ServerMessage::Response { id, result } => return Some((id, result)),
                ServerMessage::Push(_) => continue,
            }
        }
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    pub async fn call(&mut self, request: Request) -> Result<Reply, ErrorReply> {
        let id = self.send(request).await;
        let (got, result) = self.response().await.expect("connection closed");
        assert_eq!(got, id);
        result
    }

    pub async fn expect_error(&mut self, request: Request, code: ErrorCode) -> String {
        match self.call(request).await {
            Err(error) => {
                assert_eq!(error.code, code, "{}", error.message);
                error.message
            }
            Ok(reply) => panic!("expected {code:?}, got {reply:?}"),
        }
    }

    pub async fn register(
        &mut self,
        code: ActivationCode,
        signer: &DeviceSigner,
    ) -> Result<Reply, ErrorReply> {
        let identity_key = signer.identity_key();
        let signature = signer.sign_payload(&register_signing_payload(&self.nonce, &identity_key));
        self.call(Request::Register {
            activation_code: code,
            identity_key,
            signature,
        })
        .await
    }

    /// Registers with a fresh code; the new account's ID.
    pub async fn registered(&mut self, server: &Server, signer: &DeviceSigner) -> AccountId {
        match self.register(server.code().await, signer).await {
            Ok(Reply::Registered { account_id, .. }) => account_id,
            other => panic!("registration failed: {other:?}"),
        }
    }

    /// Sends a request without waiting for an answer; returns its id.
    pub async fn send(&mut self, request: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = encode_client(&ClientFrame { id, request });
        self.send_raw(Message::Binary(bytes.into())).await;
        id
    }

    pub async fn login(&mut self, account_id: &AccountId, signer: &DeviceSigner) {
        let signature = signer.sign_payload(&login_signing_payload(&self.nonce, account_id));
        let reply = self
            .call(Request::Login {
                account_id: account_id.clone(),
                device: umbra_proto::DeviceId::FIRST,
                signature,
            })
            .await;
        assert!(matches!(reply, Ok(Reply::LoggedIn { .. })), "{reply:?}");
    }

    /// Logs in as `device` of `account_id`, signing with `signer`.
    pub async fn login_device(
        &mut self,
        account_id: &AccountId,
        device: umbra_proto::DeviceId,
        signer: &DeviceSigner,
    ) -> Result<Reply, ErrorReply> {
        let signature = signer.sign_payload(&login_signing_payload(&self.nonce, account_id));
        self.call(Request::Login {
            account_id: account_id.clone(),
            signature,
            device,
        })
        .await
    }

    /// The server still answers on this connection.
    pub async fn alive(&mut self) {
        assert_eq!(self.call(Request::Ping).await, Ok(Reply::Done));
    }
}

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// The next message on `raw` is an error with `code` (id 0: about the
/// connection, not a request), then the connection closes.
pub async fn closed_with(raw: &mut Raw, code: ErrorCode) -> String {
    let message = tokio::time::timeout(PATIENCE, async {
        loop {
            match raw.next().await {
                Some(ServerMessage::Push(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the server neither answered nor closed");
    let text = match message {
        Some(ServerMessage::Response {
            id: 0,
            result: Err(error),
        }) => {
            assert_eq!(error.code, code, "{}", error.message);
            error.message
        }
        other => panic!("expected {code:?}, got {other:?}"),
    };
    let after = tokio::time::timeout(PATIENCE, raw.next())
        .await
        .expect("the connection stayed open");
    assert!(after.is_none(), "the connection stayed open: {after:?}");
    text
}

/// A group of one created by `raw`'s account over the real protocol.
pub async fn solo_group(
    raw: &mut Raw,
    signer: &DeviceSigner,
    account: &umbra_proto::AccountId,
) -> umbra_proto::GroupId {
    use umbra_mls::{Crypto, Group, GroupConfig, Provider};
    let crypto = Crypto::default();
    let mut db = rusqlite::Connection::open_in_memory().unwrap();
    umbra_mls::init_storage(&mut db).unwrap();
    let provider = Provider::new(&crypto, &db);
    let group = Group::create(&provider, signer, account, &GroupConfig::default(), 0).unwrap();
    let group_id = umbra_proto::GroupId::new(group.id()).unwrap();
    let group_info = group.group_info(&provider, signer).unwrap();
    assert_eq!(
        raw.call(Request::CreateGroup {
            group_id: group_id.clone(),
            group_info,
            delivery_key: None,
        })
        .await,
        Ok(Reply::Done)
    );
    group_id
}
