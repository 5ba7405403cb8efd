//! Every workload at its `--quick` size against the real `umbra-server`
//! binary: the run completes and nothing accepted is lost or duplicated.
//! A smoke test, not a measurement: no speed is asserted.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn server_bin() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_umbra-bench"));
    let server = bench.with_file_name("umbra-server");
    assert!(
        server.exists(),
        "{} is missing: build the workspace (`cargo build --workspace`) or run ./scripts/test",
        server.display()
    );
    server
}

fn run(args: &[&str]) -> Value {
    let work = tempfile::tempdir().expect("temporary directory");
    let results = work.path().join("results");
    let output = Command::new(env!("CARGO_BIN_EXE_umbra-bench"))
        .arg("--quick")
        .arg("--server-bin")
        .arg(server_bin())
        .arg("--work")
        .arg(work.path())
        .arg("--results")
        .arg(&results)
        .args(args)
        .output()
        .expect("umbra-bench runs");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "umbra-bench {args:?} failed:\n{log}"
    );
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let text = std::fs::read_to_string(&path).expect("the result file it printed");
    serde_json::from_str(&text).expect("JSON result")
}

fn number(value: &Value, pointer: &str) -> f64 {
    value
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {value:#}"))
}

/// Nothing accepted went missing or arrived twice, and something was sent.
fn assert_exact(result: &Value, at: &str) {
    assert_eq!(
        number(result, &format!("{at}/lost")),
        0.0,
        "lost: {result:#}"
    );
    let duplicates = result
        .pointer(&format!("{at}/duplicates"))
        .or_else(|| result.pointer(&format!("{at}/observed/duplicates")))
        .and_then(Value::as_f64)
        .expect("a duplicate count");
    assert_eq!(duplicates, 0.0, "duplicates: {result:#}");
}

#[test]
fn relay_delivers_every_accepted_message_once_with_and_without_tls() {
    for tls in [false, true] {
        let mut args = vec!["relay"];
        if tls {
            args.insert(0, "--tls");
        }
        let result = run(&args);
        let point = result.pointer("/points/0").expect("one rate point");
        assert_exact(point, "");
        let accepted = number(point, "/observed/accepted");
        assert!(accepted >= 1000.0, "500/s for 3 s: {point:#}");
        assert_eq!(number(point, "/observed/delivered"), accepted);
        assert_eq!(number(point, "/observed/refused"), 0.0);
        assert!(number(point, "/observed/p99_ms") > 0.0);
    }
}

#[test]
fn a_node_killed_in_the_middle_of_a_relay_loses_nothing() {
    // Two nodes on a private PostgreSQL and nats-server; the second node
    // is killed with SIGKILL a second into 4 s of relay at 200/s.
    let result = run(&["--nodes", "2", "failover"]);
    let outcome = result.pointer("/result").expect("result");
    assert_eq!(number(outcome, "/lost"), 0.0, "lost: {outcome:#}");
    assert_eq!(
        number(outcome, "/devices_moved"),
        20.0,
        "half of the 40 devices were on the killed node: {outcome:#}"
    );
    // The surviving node's 20 senders send 400 of the 800, each one
    // accepted (their recipients' mailboxes keep them while they move).
    let accepted = number(outcome, "/observed/accepted");
    assert!(accepted >= 400.0, "{outcome:#}");
    let delivered = number(outcome, "/observed/delivered");
    assert!(delivered >= accepted, "{outcome:#}");
    // The bound for a killed node's devices, not a measurement.
    let served = number(outcome, "/served_again_max_ms");
    assert!(
        served > 0.0 && served < 10_000.0,
        "every moved device served again within 10 s: {outcome:#}"
    );
}

#[test]
fn offline_messages_survive_a_sigkill_and_drain() {
    let result = run(&["offline"]);
    let outcome = result.pointer("/result").expect("result");
    assert_eq!(outcome.pointer("/killed"), Some(&Value::Bool(true)));
    assert_eq!(number(outcome, "/accepted"), 500.0, "10 senders x 50");
    assert_exact(outcome, "");
}

#[test]
fn fanout_reaches_every_member() {
    let result = run(&["fanout"]);
    for point in result["points"].as_array().expect("points") {
        assert_exact(point, "");
        let recipients = number(point, "/recipients_per_message");
        let accepted = number(point, "/observed/accepted");
        assert!(accepted > 0.0);
        assert_eq!(number(point, "/observed/delivered"), accepted * recipients);
    }
}

#[test]
fn idle_devices_stay_connected_and_cost_memory() {
    let result = run(&["idle"]);
    assert_eq!(number(&result, "/result/devices"), 200.0);
    assert!(number(&result, "/result/kib_per_connection") > 0.0);
}

#[test]
fn a_storm_of_tls_reconnects_drains_every_backlog() {
    let result = run(&["--tls", "storm"]);
    let outcome = result.pointer("/result").expect("result");
    assert_eq!(
        number(outcome, "/delivered"),
        50.0 * 5.0,
        "50 receivers x 5"
    );
    assert_exact(outcome, "");
}

#[test]
fn soak_with_churn_loses_nothing() {
    let result = run(&["soak"]);
    let outcome = result.pointer("/result").expect("result");
    assert!(number(outcome, "/observed/accepted") > 500.0);
    assert_eq!(number(outcome, "/errors"), 0.0);
    assert_exact(outcome, "");
}

#[test]
fn every_device_of_every_account_gets_each_message() {
    // Relay: the peer's three devices and the sender's two others.
    let result = run(&["--devices-per-account", "3", "relay"]);
    assert_eq!(number(&result, "/devices_per_account"), 3.0);
    let point = result.pointer("/points/0").expect("one rate point");
    assert_exact(point, "");
    assert_eq!(number(point, "/recipients_per_message"), 5.0);
    let accepted = number(point, "/observed/accepted");
    assert!(accepted >= 1000.0, "500/s for 3 s: {point:#}");
    assert_eq!(number(point, "/observed/delivered"), accepted * 5.0);
    // Fanout: groups of 5 and 20 accounts, 3 devices each.
    let result = run(&["--devices-per-account", "3", "fanout"]);
    let points = result["points"].as_array().expect("points");
    let recipients: Vec<f64> = points
        .iter()
        .map(|p| number(p, "/recipients_per_message"))
        .collect();
    assert_eq!(recipients, vec![14.0, 59.0]);
    for point in points {
        assert_exact(point, "");
        let accepted = number(point, "/observed/accepted");
        assert!(accepted > 0.0);
        assert_eq!(
            number(point, "/observed/delivered"),
            accepted * number(point, "/recipients_per_message")
        );
    }
}

#[test]
fn workloads_without_accounts_of_several_devices_refuse_them() {
    let status = Command::new(env!("CARGO_BIN_EXE_umbra-bench"))
        .args(["--quick", "--devices-per-account", "3", "storm"])
        .output()
        .expect("umbra-bench runs");
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("relay and fanout"));
}

/// Attachments against Umbra over TLS: every download is checked byte for
/// byte by the workload itself, so a completed run moved what it uploaded.
#[test]
fn files_go_up_and_come_back_whole() {
    let result = run(&["--system", "umbra", "--tls", "files"]);
    let points = result
        .pointer("/result/one_at_a_time")
        .and_then(Value::as_array)
        .expect("one point per file size");
    assert_eq!(points.len(), 2, "{result:#}");
    for point in points {
        assert!(number(point, "/files") >= 3.0, "{point:#}");
        assert!(number(point, "/download_mb_s") > 0.0, "{point:#}");
    }
    assert_eq!(number(&result, "/result/concurrent/transfers"), 4.0);
}
