//! The `umbra-server` binary itself, as an operator runs it.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The server's memory must not come in transparent huge pages: one live
/// byte keeps a whole 2 MiB page resident, and under steady load the
/// server's memory then climbed in steps for as long as it ran.
#[cfg(target_os = "linux")]
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_umbra-server"))
        .arg("--data")
        .arg(data.path())
        .arg("run")
        .env("UMBRA_LISTEN", "127.0.0.1:0")
        .env("UMBRA_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", server.id());
    // Until the process has started main (its status says so as soon as
    // the flag is set), or it has gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let flag = text
            .lines()
            .find_map(|line| line.strip_prefix("THP_enabled:"))
            .map(|value| value.trim().to_owned());
        if flag.as_deref() == Some("0") {
            seen = flag;
            break;
        }
        if server.try_wait().unwrap().is_some() {
            break;
        }
        seen = flag;
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(seen.as_deref(), Some("0"), "THP_enabled in {status}");
}

/// The first line the server logs as it starts (`umbra-server listening`),
/// run with these extra arguments, standard error a pipe (not a terminal).
fn first_log_line(extra: &[&str]) -> String {
    use std::io::BufRead;
    let data = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_umbra-server"))
        .arg("--data")
        .arg(data.path())
        .args(extra)
        .arg("run")
        .env("UMBRA_LISTEN", "127.0.0.1:0")
        .env("UMBRA_LOG", "info")
        .env_remove("UMBRA_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("listening"))
    });
    // The reader ends when the line comes, or when the process is killed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.kill();
    let _ = server.wait();
    reader
        .join()
        .unwrap()
        .expect("the server logged that it listens")
}

/// `--log-format json` writes one JSON object per line for a collector;
/// the default text has no colour codes when standard error is not a
/// terminal.
#[test]
fn logs_are_json_on_request_and_plain_text_in_a_pipe() {
    let line = first_log_line(&["--log-format", "json"]);
    let object: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(object["level"], "INFO", "{line}");
    assert_eq!(
        object["fields"]["message"], "umbra-server listening",
        "{line}"
    );
    let line = first_log_line(&[]);
    assert!(line.contains("umbra-server listening"), "{line}");
    assert!(!line.contains('\u{1b}'), "colour codes in a pipe: {line:?}");
}
