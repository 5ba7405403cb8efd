//! The `umbra` binary against a real server: what a script would do.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use umbra_server::{Config, ServerOptions};

struct Server {
    data: tempfile::TempDir,
    config: Config,
    shutdown: CancellationToken,
}

impl Server {
    async fn start() -> Server {
        let data = tempfile::tempdir().unwrap();
        umbra_server::init(data.path(), "127.0.0.1:0").unwrap();
        let mut config = Config::load(data.path()).unwrap();
        drop(umbra_server::open_store(data.path(), &config).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        config.public_address = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        tokio::spawn(umbra_server::run(
            config.clone(),
            data.path().to_owned(),
            listener,
            shutdown.clone(),
            ServerOptions::default(),
        ));
        Server {
            data,
            config,
            shutdown,
        }
    }

    async fn activation(&self) -> String {
        let strings =
            umbra_server::admin::issue_codes(self.data.path(), &self.config, 30, 1, 1_800_000_000)
                .await
                .unwrap();
        strings[0].to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `umbra --json --home HOME ARGS` off the async runtime's threads.
async fn umbra(home: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_umbra"));
    command
        .arg("--json")
        .arg("--home")
        .arg(home)
        .args(args)
        .env("UMBRA_PASSPHRASE", "a long test passphrase");
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn lines(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

async fn ok(home: &Path, args: &[&str]) -> Vec<Value> {
    let output = umbra(home, args).await;
    assert!(
        output.status.success(),
        "umbra {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    lines(&output)
}

fn messages(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "message_received")
        .map(|e| e["message"]["body"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_talk_through_the_cli() {
    let server = Server::start().await;
    let (alice, bob, carol) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut ids = Vec::new();
    for home in [&alice, &bob, &carol] {
        let activated = ok(home.path(), &["activate", &server.activation().await]).await;
        ids.push(activated[0]["account_id"].as_str().unwrap().to_owned());
    }
    let (a, b, c) = (ids[0].as_str(), ids[1].as_str(), ids[2].as_str());
    assert_eq!(ok(alice.path(), &["whoami"]).await[0]["account_id"], a);

    // Before acceptance: a clear refusal and exit code 5.
    ok(alice.path(), &["contacts", "add", b]).await;
    let refused = umbra(alice.path(), &["send", b, "too early"]).await;
    assert_eq!(refused.status.code(), Some(5));
    assert_eq!(
        lines(&refused)[0]["error"],
        format!("contact {b} has not accepted your request yet")
    );

    let requests = ok(bob.path(), &["recv"]).await;
    assert!(
        requests
            .iter()
            .any(|e| e["event"] == "contact_request" && e["from"] == a)
    );
    ok(bob.path(), &["contacts", "accept", a]).await;
    ok(bob.path(), &["send", a, "hello", "alice"]).await;
    let received = ok(alice.path(), &["recv"]).await;
    assert_eq!(messages(&received), vec!["hello alice"]);
    let sent = ok(alice.path(), &["send", b, "hi bob"]).await;
    assert_eq!(sent[0]["state"], "sent");
    assert_eq!(messages(&ok(bob.path(), &["recv"]).await), vec!["hi bob"]);

    // Safety numbers agree on both sides.
    let from_alice = ok(alice.path(), &["contacts", "verify", b, "--mark"]).await;
    let from_bob = ok(bob.path(), &["contacts", "verify", a]).await;
    assert_eq!(from_alice[0]["safety_number"], from_bob[0]["safety_number"]);
    let contacts = ok(alice.path(), &["contacts", "list"]).await;
    assert_eq!(
        (
            contacts[0]["account"].as_str(),
            contacts[0]["verified"].as_bool()
        ),
        (Some(b), Some(true))
    );

    // A group with Carol.
    ok(alice.path(), &["contacts", "add", c]).await;
    ok(carol.path(), &["recv"]).await;
    ok(carol.path(), &["contacts", "accept", a]).await;
    let created = ok(
        alice.path(),
        &["groups", "create", "Crew", "--member", &format!("{b},{c}")],
    )
    .await;
    let group = created[0]["conversation"].as_str().unwrap().to_owned();
    ok(alice.path(), &["send", &group, "to the crew"]).await;
    assert_eq!(
        messages(&ok(carol.path(), &["recv"]).await),
        vec!["to the crew"]
    );
    assert_eq!(
        messages(&ok(bob.path(), &["recv"]).await),
        vec!["to the crew"]
    );
    let listed = ok(bob.path(), &["groups", "list"]).await;
    assert!(
        listed
            .iter()
            .any(|g| g["id"] == group.as_str() && g["name"] == "Crew"),
        "{listed:?}"
    );
    let history = ok(alice.path(), &["history", b]).await;
    let bodies: Vec<&str> = history
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, vec!["hello alice", "hi bob"]);

    // The wrong passphrase: exit code 3, no damage.
    let mut command = Command::new(env!("CARGO_BIN_EXE_umbra"));
    command
        .args(["--home"])
        .arg(alice.path())
        .arg("whoami")
        .env("UMBRA_PASSPHRASE", "wrong");
    let wrong = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(wrong.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong passphrase"));
    ok(alice.path(), &["whoami"]).await;
}

#[test]
fn help_is_there_for_a_newcomer() {
    let output = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "activate",
        "contacts",
        "send",
        "recv",
        "listen",
        "groups",
        "history",
        "UMBRA_PASSPHRASE",
        "Exit codes",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}");
    }
}
