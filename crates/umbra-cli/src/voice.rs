//! `umbra voice …`: record a voice note into a draft, listen back, send
//! it; play the ones received. The microphone and the speaker are the
//! machine's own recorder and player programs (PipeWire's, PulseAudio's
//! or ALSA's), fed and read as raw 16-bit mono at 48 kHz: no audio library
//! is built into `umbra`, and a machine without sound says so.

use std::io::{IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;
use umbra_client::voice::{SAMPLE_RATE, wav_header};
use umbra_client::{Client, VoiceDraft, VoiceSource, play_voice};

use crate::{Cli, Out, conversation, online, open};

#[derive(Debug, Subcommand)]
pub(crate) enum VoiceCommand {
    /// Record a voice note into a draft, shown with the time and a level
    /// meter. The draft is kept encrypted on this device as it is
    /// recorded, so an interruption (Ctrl-C, a crash, the battery) loses
    /// at most half a second of it. Records from the microphone through
    /// the first of pw-record, parec or arecord found, or from --input.
    /// Press Enter to stop. At most 15 minutes.
    Record {
        /// Record from this file instead of the microphone: a WAV file, or
        /// raw signed 16-bit little-endian mono at 48 kHz; `-` reads raw
        /// audio from standard input (for example
        /// `arecord -f S16_LE -r 48000 -c 1 -t raw | umbra voice record --input -`).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Stop after this many seconds.
        #[arg(long)]
        max_seconds: Option<u32>,
    },
    /// List this device's voice note drafts.
    Drafts,
    /// Listen to a voice note: a received (or sent) one by MESSAGE_ID, or
    /// a draft (--draft). Plays through the first of pw-play, paplay or
    /// aplay found, or writes a WAV file (--out).
    Play {
        /// The message carrying the note (`history --json` shows `id`).
        message_id: Option<i64>,
        /// A draft's number (`voice drafts`) instead of a message.
        #[arg(long, conflicts_with = "message_id")]
        draft: Option<i64>,
        /// How fast: 1, 1.5 or 2 (faster keeps the voice's pitch).
        #[arg(long, default_value = "1", value_parser = ["1", "1.5", "2"])]
        speed: String,
        /// Write the audio to this WAV file (`-`: standard output) instead
        /// of playing it. The file is not encrypted.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Send a voice note to a contact or a group: the latest finished
    /// draft, the one named by --draft (a recording cut off is sent only
    /// when named), or an audio file (--file: WAV or Ogg Opus, encoded
    /// here, without its tags). A sent draft is deleted; if the upload is
    /// interrupted, `umbra uploads resume` finishes it.
    Send {
        /// Account ID (one-to-one) or conversation ID (group).
        target: String,
        #[arg(long, conflicts_with = "file")]
        draft: Option<i64>,
        #[arg(long)]
        file: Option<PathBuf>,
        /// Text shown with the note.
        #[arg(long)]
        caption: Option<String>,
    },
    /// Delete a draft.
    Discard { draft: i64 },
}

/// Recorders tried in turn: each prints raw s16le mono at 48 kHz.
const RECORDERS: &[(&str, &[&str])] = &[
    (
        "pw-record",
        &["--format", "s16", "--rate", "48000", "--channels", "1", "-"],
    ),
    (
        "parec",
        &["--raw", "--format=s16le", "--rate=48000", "--channels=1"],
    ),
    (
        "arecord",
        &["-q", "-f", "S16_LE", "-r", "48000", "-c", "1", "-t", "raw"],
    ),
];

/// Players tried in turn: each reads raw s16le mono at 48 kHz.
const PLAYERS: &[(&str, &[&str])] = &[
    (
        "pw-play",
        &["--format", "s16", "--rate", "48000", "--channels", "1", "-"],
    ),
    (
        "paplay",
        &["--raw", "--format=s16le", "--rate=48000", "--channels=1"],
    ),
    (
        "aplay",
        &["-q", "-f", "S16_LE", "-r", "48000", "-c", "1", "-t", "raw"],
    ),
];

/// The first of `programs` found on PATH.
fn find(programs: &'static [(&'static str, &'static [&'static str])]) -> Option<Command> {
    let path = std::env::var_os("PATH")?;
    programs.iter().find_map(|(name, args)| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
            .map(|program| {
                let mut command = Command::new(program);
                command.args(*args);
                command
            })
    })
}

pub(crate) fn minutes(ms: u32) -> String {
    format!("{}:{:02}", ms / 60_000, ms / 1000 % 60)
}

/// A waveform drawn with block characters.
pub(crate) fn bars(levels: &[u8]) -> String {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    levels
        .iter()
        .map(|&l| BLOCKS[usize::from(l) * BLOCKS.len() / 256])
        .collect()
}

fn describe(draft: &VoiceDraft) -> String {
    format!(
        "draft {}: {}{}",
        draft.id,
        minutes(draft.duration_ms),
        if draft.finished { "" } else { " (cut off)" }
    )
}

pub(crate) async fn voice(cli: &Cli, out: &Out, command: &VoiceCommand) -> anyhow::Result<()> {
    match command {
        VoiceCommand::Record { input, max_seconds } => {
            let client = open(cli)?;
            let max_ms = max_seconds.map(|s| s.saturating_mul(1000));
            let input = input.clone();
            let json = out.json;
            let draft =
                tokio::task::spawn_blocking(move || record(&client, input, max_ms, json)).await??;
            out.value(json!({ "draft": draft }), || {
                format!(
                    "{}. Listen: `umbra voice play --draft {id}`; send: `umbra voice send CONTACT --draft {id}`",
                    describe(&draft),
                    id = draft.id
                )
            });
        }
        VoiceCommand::Drafts => {
            let drafts = open(cli)?.voice_drafts()?;
            out.value(json!({ "drafts": drafts }), || {
                if drafts.is_empty() {
                    "no voice note drafts".into()
                } else {
                    drafts.iter().map(describe).collect::<Vec<_>>().join("\n")
                }
            });
        }
        VoiceCommand::Play {
            message_id,
            draft,
            speed,
            out: path,
        } => {
            let (client, source) = match (message_id, draft) {
                (Some(id), None) => (online(cli).await?, VoiceSource::Message(*id)),
                (None, Some(id)) => (open(cli)?, VoiceSource::Draft(*id)),
                _ => bail!("name a message (MESSAGE_ID) or a draft (--draft ID)"),
            };
            let speed: f32 = speed.parse().context("speed")?;
            let to_stdout = path.as_deref() == Some(Path::new("-"));
            if to_stdout && std::io::stdout().is_terminal() {
                bail!(
                    "standard output is a terminal, not a place for audio: pipe it \
                     (`umbra voice play … --out - | aplay`) or name a file (`--out note.wav`)"
                );
            }
            let ogg = client.voice_note(source).await?;
            let path = path.clone();
            let samples =
                tokio::task::spawn_blocking(move || play(&ogg, speed, path.as_deref())).await??;
            let ms = (samples * 1000 / u64::from(SAMPLE_RATE)) as u32;
            if to_stdout {
                // Standard output carries the audio.
                return Ok(());
            }
            out.value(json!({ "played_ms": ms }), || {
                format!("played {}", minutes(ms))
            });
        }
        VoiceCommand::Send {
            target,
            draft,
            file,
            caption,
        } => {
            let client = online(cli).await?;
            let id = conversation(&client, target)?;
            let message = match (file, draft) {
                (Some(path), _) => {
                    client
                        .send_voice_file(&id, path, caption.as_deref())
                        .await?
                }
                (None, Some(draft)) => {
                    client
                        .send_voice_draft(&id, *draft, caption.as_deref())
                        .await?
                }
                (None, None) => {
                    // The latest that was ended: one cut off (or still
                    // being recorded) goes only when named.
                    let Some(latest) = client.voice_drafts()?.into_iter().rfind(|d| d.finished)
                    else {
                        bail!(
                            "no finished voice note draft: record one with `umbra voice record` \
                             (one cut off is sent with --draft N; `umbra voice drafts` lists them)"
                        );
                    };
                    client
                        .send_voice_draft(&id, latest.id, caption.as_deref())
                        .await?
                }
            };
            out.message(&message);
        }
        VoiceCommand::Discard { draft } => {
            open(cli)?.discard_voice_draft(*draft)?;
            out.value(json!({ "discarded": draft }), || {
                format!("draft {draft} deleted")
            });
        }
    }
    Ok(())
}

/// Where recorded audio comes from.
pub(crate) enum Input {
    /// Raw signed 16-bit little-endian mono at 48 kHz.
    Raw(Box<dyn Read + Send>),
    /// The machine's recorder program, printing the same.
    Recorder(Child),
}

/// A child program's standard error, read as it comes (so a chatty
/// program never blocks on a full pipe); its last line kept to say why it
/// stopped.
fn drain_stderr(child: &mut Child) -> Stderr {
    let last = Arc::new(Mutex::new(String::new()));
    let reader = child.stderr.take().map(|stderr| {
        let last = last.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !line.trim().is_empty() {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = line.trim().to_owned();
                }
            }
        })
    });
    Stderr { last, reader }
}

/// A program's standard error, read as it runs.
struct Stderr {
    last: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Stderr {
    /// The last line it wrote, once it has ended (after its program has
    /// exited: waited for half a second at most).
    fn last_line(&self) -> String {
        if let Some(reader) = &self.reader {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
            while !reader.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Kills `child` once `stop` is set (which ends a read or write blocked on
/// it), or leaves it once it has exited.
fn kill_on_stop(child: Arc<Mutex<Child>>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        loop {
            {
                let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
                if stop.load(Ordering::SeqCst) {
                    let _ = child.kill();
                    return;
                }
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
}

impl Input {
    /// The machine's microphone, through the first recorder found.
    pub(crate) fn microphone() -> anyhow::Result<Input> {
        let Some(mut command) = find(RECORDERS) else {
            bail!(no_microphone(
                "no recorder program was found (pw-record, parec, arecord)"
            ));
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the recorder")?;
        Ok(Input::Recorder(child))
    }

    /// A WAV file, a file of raw audio, or standard input (`-`).
    fn from_path(path: &Path) -> anyhow::Result<Input> {
        if path == Path::new("-") {
            return Ok(Input::Raw(Box::new(std::io::stdin())));
        }
        // Buffered: hound reads a sample at a time.
        let mut file = std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        );
        let mut head = [0u8; 12];
        let got = read_full(&mut file, &mut head)?;
        let rest = std::io::Read::chain(std::io::Cursor::new(head[..got].to_vec()), file);
        if got == 12 && head.starts_with(b"RIFF") && head[8..12] == *b"WAVE" {
            let wav = umbra_client::voice::WavPcm::new(rest)?;
            Ok(Input::Raw(Box::new(WavAsRaw {
                wav,
                block: Vec::new(),
                bytes: Vec::new(),
                at: 0,
            })))
        } else {
            Ok(Input::Raw(Box::new(rest)))
        }
    }
}

/// A WAV file read as the recorder's raw audio (16-bit mono at 48 kHz),
/// a block at a time.
struct WavAsRaw<R: Read> {
    wav: umbra_client::voice::WavPcm<R>,
    block: Vec<f32>,
    /// The block as raw audio, and how much of it was read.
    bytes: Vec<u8>,
    at: usize,
}

impl<R: Read> Read for WavAsRaw<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.bytes.len() {
            self.block.clear();
            let more = self
                .wav
                .next_block(&mut self.block)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            if !more {
                return Ok(0);
            }
            self.bytes.clear();
            self.at = 0;
            umbra_client::voice::to_i16(&self.block, &mut self.bytes);
        }
        let n = buffer.len().min(self.bytes.len() - self.at);
        buffer[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Records from the microphone or `input` into a new draft until the
/// input ends, Enter is pressed, the time is up or Ctrl-C; shows the time
/// and a level meter (or, with `--json`, `recording` events).
fn record(
    client: &Client,
    input: Option<PathBuf>,
    max_ms: Option<u32>,
    json: bool,
) -> anyhow::Result<VoiceDraft> {
    let source = match input.as_deref() {
        Some(path) => Input::from_path(path)?,
        None => Input::microphone()?,
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Enter stops, when standard input is a person's and not the audio.
    if input.as_deref() != Some(Path::new("-")) && std::io::stdin().is_terminal() {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            stop.store(true, Ordering::SeqCst);
        });
    }
    // Ctrl-C ends the recording as Enter does (what was recorded is kept
    // either way).
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let stop = stop.clone();
        handle.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let meter = std::io::stderr().is_terminal() && !json;
    let mut last_shown = 0;
    let draft = record_from(client, source, &stop, max_ms, |ms, level| {
        if ms < last_shown + 100 {
            return;
        }
        last_shown = ms;
        if meter {
            let level = usize::from(level) * 20 / 256;
            eprint!(
                "\r\u{25cf} {}  [{:<20}]  Enter to stop ",
                minutes(ms),
                "\u{2588}".repeat(level)
            );
            let _ = std::io::stderr().flush();
        } else if json && ms % 500 < 100 {
            println!(
                "{}",
                json!({ "event": "recording", "duration_ms": ms, "level": level })
            );
        }
    });
    if meter {
        eprintln!();
    }
    draft
}

/// Records from `source` into a new draft until it ends, `stop` is set,
/// `max_ms` is reached or the note is as long as a note may be; `progress`
/// is told the time and level as it goes. The draft is saved every half
/// second along the way, and finished at the end.
pub(crate) fn record_from(
    client: &Client,
    source: Input,
    stop: &Arc<AtomicBool>,
    max_ms: Option<u32>,
    mut progress: impl FnMut(u32, u8),
) -> anyhow::Result<VoiceDraft> {
    let (mut reader, recorder, why): (Box<dyn Read + Send>, _, _) = match source {
        Input::Raw(reader) => (reader, None, None),
        Input::Recorder(mut child) => {
            let why = drain_stderr(&mut child);
            let Some(stdout) = child.stdout.take() else {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the recorder's output could not be read");
            };
            let child = Arc::new(Mutex::new(child));
            kill_on_stop(child.clone(), stop.clone());
            (Box::new(stdout), Some(child), Some(why))
        }
    };
    let recording = client.record_voice();
    let mut recording = match recording {
        Ok(recording) => recording,
        Err(error) => {
            stop.store(true, Ordering::SeqCst);
            return Err(error.into());
        }
    };
    let mut buffer = vec![0u8; 960 * 2];
    let mut pcm = Vec::with_capacity(960);
    let mut got_any = false;
    let mut asked_to_stop = false;
    let outcome = loop {
        if stop.load(Ordering::SeqCst) {
            asked_to_stop = true;
            break Ok(());
        }
        if recording.is_full() || max_ms.is_some_and(|max| recording.duration_ms() >= max) {
            asked_to_stop = true;
            break Ok(());
        }
        let read = match read_full(reader.as_mut(), &mut buffer) {
            Ok(read) if read >= 2 => read,
            Ok(_) => break Ok(()),
            Err(error) => break Err(anyhow::Error::from(error)),
        };
        got_any = true;
        pcm.clear();
        pcm.extend(
            buffer[..read - read % 2]
                .chunks_exact(2)
                .map(|s| f32::from(i16::from_le_bytes([s[0], s[1]])) / 32768.0),
        );
        if let Err(error) = recording.push(&pcm) {
            break Err(error.into());
        }
        progress(recording.duration_ms(), recording.level());
    };
    // The recorder goes (it may be blocked writing to the pipe).
    stop.store(true, Ordering::SeqCst);
    drop(reader);
    let status = recorder
        .as_ref()
        .map(|child| {
            let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = child.kill();
            child.wait()
        })
        .transpose()?;
    if !got_any {
        client.discard_voice_draft(recording.draft_id())?;
        if let Err(error) = outcome {
            // The input failed before it gave anything (a WAV file that
            // is broken from its start): that, not "empty", is the news.
            bail!("nothing was recorded: {error}");
        }
        if asked_to_stop {
            bail!("nothing was recorded: it was stopped before any sound arrived");
        }
        if let (Some(status), Some(why)) = (status, why) {
            let why = why.last_line();
            bail!(no_microphone(&format!(
                "the recorder could not open a microphone ({status}{}{why})",
                if why.is_empty() { "" } else { ": " }
            )));
        }
        bail!("nothing was recorded: the input was empty");
    }
    let draft = recording.draft_id();
    let finished = recording.finish();
    match (outcome, finished) {
        (Ok(()), finished) => Ok(finished?),
        (Err(error), Ok(_)) => Err(error.context(format!(
            "the recording stopped; what was recorded is kept as draft {draft}"
        ))),
        (Err(error), Err(_)) => Err(error.context(format!(
            "the recording stopped; what was saved of it is draft {draft}"
        ))),
    }
}

fn no_microphone(why: &str) -> String {
    format!(
        "this machine has no audio device Umbra can record from: {why}. Record the note \
         elsewhere and send the file (`umbra voice send CONTACT --file note.wav`), or pipe \
         raw audio in (`umbra voice record --input -`, signed 16-bit mono at 48 kHz)"
    )
}

/// Reads until `buffer` is full or the input ends.
fn read_full(reader: &mut dyn Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Plays `ogg` at `speed` to the machine's player, or writes it as WAV to
/// `path` (`-`: standard output). Returns the samples played.
fn play(ogg: &[u8], speed: f32, path: Option<&Path>) -> anyhow::Result<u64> {
    let Some(path) = path else {
        return play_on_device(ogg, speed, &Arc::new(AtomicBool::new(false)));
    };
    if path == Path::new("-") {
        // A stream's header says "as long as it goes": its length is not
        // known until the end.
        let mut output = std::io::stdout().lock();
        output.write_all(&wav_header(None))?;
        let samples = write_wav(ogg, speed, &mut output)?;
        output.flush()?;
        return Ok(samples);
    }
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    // The note in the clear: readable by its owner only, as `umbra save`
    // writes a file.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let written = (|| {
        file.write_all(&wav_header(None))?;
        let samples = write_wav(ogg, speed, &mut file)?;
        // The header again, now that the length is known: through the
        // same handle, so it lands in the file that was created.
        file.seek(std::io::SeekFrom::Start(0))?;
        file.write_all(&wav_header(Some(samples)))?;
        file.sync_all()?;
        anyhow::Ok(samples)
    })();
    if written.is_err() {
        // A note refused part way leaves no half of it behind.
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Decodes `ogg` at `speed` into `output` as 16-bit samples. Returns the
/// samples written.
fn write_wav(ogg: &[u8], speed: f32, output: &mut dyn Write) -> anyhow::Result<u64> {
    let mut bytes = Vec::new();
    Ok(play_voice(ogg, speed, |pcm| {
        bytes.clear();
        umbra_client::voice::to_i16(pcm, &mut bytes);
        output
            .write_all(&bytes)
            .map_err(|e| umbra_client::ClientError::Invalid(e.to_string()))
    })?)
}

/// Plays `ogg` at `speed` through the machine's player program until it
/// ends or `stop` is set. Returns the samples played.
pub(crate) fn play_on_device(
    ogg: &[u8],
    speed: f32,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let Some(mut command) = find(PLAYERS) else {
        bail!(
            "this machine has no audio player Umbra can use (pw-play, paplay, aplay): \
             write the note to a file with `umbra voice play … --out note.wav`"
        );
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the player")?;
    let why = drain_stderr(&mut child);
    let Some(mut stdin) = child.stdin.take() else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the player's input could not be written");
    };
    let child = Arc::new(Mutex::new(child));
    // This playback's own flag: set when it ends, however it ends (a
    // guard), it lets the watcher go.
    let done = Arc::new(AtomicBool::new(false));
    let _done = SetOnDrop(done.clone());
    {
        let (stop, done, child) = (stop.clone(), done.clone(), child.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if stop.load(Ordering::SeqCst) {
                    // Ends a write blocked on a player that stopped reading.
                    let _ = child.lock().unwrap_or_else(|e| e.into_inner()).kill();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
    }
    let mut bytes = Vec::new();
    let played = play_voice(ogg, speed, |pcm| {
        if stop.load(Ordering::SeqCst) {
            return Err(umbra_client::ClientError::Invalid("stopped".into()));
        }
        bytes.clear();
        umbra_client::voice::to_i16(pcm, &mut bytes);
        stdin
            .write_all(&bytes)
            .map_err(|e| umbra_client::ClientError::Invalid(e.to_string()))
    });
    drop(stdin);
    let played = match played {
        Ok(played) => played,
        Err(error) => {
            let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
            // A note refused part way (or a stop): what reached the
            // player is not played out.
            let _ = child.kill();
            let status = child.wait().ok();
            if stop.load(Ordering::SeqCst) {
                return Ok(0);
            }
            // A player that ended by itself with an error (no device to
            // open: it broke the pipe) rather than by the kill: its own
            // words say why.
            if let Some(status) = status.filter(|s| s.code().is_some_and(|code| code != 0)) {
                return Err(no_player(status, &why));
            }
            return Err(error.into());
        }
    };
    // Waited for without holding the lock, so a stop can still kill a
    // player that hangs while it drains.
    let status = loop {
        if let Some(status) = child.lock().unwrap_or_else(|e| e.into_inner()).try_wait()? {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if stop.load(Ordering::SeqCst) {
        return Ok(0);
    }
    if !status.success() {
        return Err(no_player(status, &why));
    }
    Ok(played)
}

/// A player that failed, and what it said.
fn no_player(status: std::process::ExitStatus, why: &Stderr) -> anyhow::Error {
    let why = why.last_line();
    anyhow::anyhow!(
        "no audio device could play the note ({status}{}{why}): write it to a file \
         with `umbra voice play … --out note.wav`",
        if why.is_empty() { "" } else { ": " }
    )
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
