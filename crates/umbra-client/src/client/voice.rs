//! Voice notes on the device: recorded into a draft that is saved in the
//! encrypted store as it is made (an interruption loses at most half a
//! second), listened back to, sent as an attachment with its length and
//! waveform; received ones played, at 1x, 1.5x or 2x. The audio itself is
//! `crate::voice`.

use std::io::Read;
use std::path::Path;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use umbra_proto::content::MAX_CAPTION_BYTES;
use zeroize::Zeroizing;

use super::Client;
use super::attachments::{Outgoing, Source};
use crate::error::{ClientError, Result};
use crate::types::{ConversationId, Message};
use crate::voice::{self, Encoder, FRAME, Frame, MAX_VOICE_MS, Note, SAMPLE_RATE};

/// Frames saved at a time while recording: half a second.
const PIECE_FRAMES: usize = 25;

/// The largest file played as a voice note (read whole into memory):
/// 15 minutes at 32 kbit/s are 3.6 MB.
const MAX_PLAYED_BYTES: u64 = 8 << 20;

/// The longest a note is played: the longest a note may be, and a minute
/// for another client's rounding (a hostile note is cut off there, not
/// decoded, or written out, for hours).
const MAX_PLAYED_MS: u64 = MAX_VOICE_MS as u64 + 60_000;

/// A recording kept on this device, not sent yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VoiceDraft {
    pub id: i64,
    /// When the recording started (seconds since the epoch).
    pub created_at: u64,
    pub duration_ms: u32,
    /// Whether it was ended; a recording cut off (the program stopped,
    /// the machine lost power) keeps what was saved of it.
    pub finished: bool,
}

/// What is played.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoiceSource {
    /// A draft of this device's.
    Draft(i64),
    /// A message's file (fetched first if it is not here yet).
    Message(i64),
}

/// A recording under way: samples in, saved to its draft every half
/// second. Dropping it without [`Recording::finish`] leaves the draft as
/// far as it was saved.
pub struct Recording {
    client: Client,
    draft: i64,
    encoder: Encoder,
    unsaved: Vec<Frame>,
    saved_frames: u64,
    seq: i64,
    level: u8,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("draft", &self.draft)
            .field("samples", &self.encoder.samples())
            .finish_non_exhaustive()
    }
}

impl Recording {
    /// The draft this recording goes into.
    pub fn draft_id(&self) -> i64 {
        self.draft
    }

    /// How long it is so far.
    pub fn duration_ms(&self) -> u32 {
        (self.encoder.samples() * 1000 / u64::from(SAMPLE_RATE)) as u32
    }

    /// The level of the latest frame (0-255), for a meter.
    pub fn level(&self) -> u8 {
        self.level
    }

    /// Whether the recording has reached the longest a note may be.
    pub fn is_full(&self) -> bool {
        self.duration_ms() >= MAX_VOICE_MS
    }

    /// Adds mono samples at 48 kHz (nominally -1.0 to 1.0); past the
    /// longest a note may be, the rest is left out.
    pub fn push(&mut self, pcm: &[f32]) -> Result<()> {
        let room = (u64::from(MAX_VOICE_MS) * u64::from(SAMPLE_RATE) / 1000)
            .saturating_sub(self.encoder.samples());
        let pcm = &pcm[..pcm.len().min(room as usize)];
        let before = self.unsaved.len();
        self.encoder.push(pcm, &mut self.unsaved)?;
        if let Some(frame) = self.unsaved[before..].last() {
            self.level = frame.level;
        }
        if self.unsaved.len() >= PIECE_FRAMES {
            self.save(false)?;
        }
        Ok(())
    }

    /// Saves what is not saved yet, in one transaction.
    fn save(&mut self, finished: bool) -> Result<()> {
        let mut frames = Vec::new();
        let mut levels = Vec::with_capacity(self.unsaved.len());
        for frame in &self.unsaved {
            frames.extend_from_slice(&(frame.packet.len() as u16).to_le_bytes());
            frames.extend_from_slice(&frame.packet);
            levels.push(frame.level);
        }
        let count = self.unsaved.len() as u64;
        let mut db = self.client.db();
        let tx = db.transaction()?;
        let updated = tx.execute(
            "UPDATE voice_drafts SET samples = ?2, frames = ?3, finished = ?4 WHERE id = ?1",
            params![
                self.draft,
                self.encoder.samples(),
                self.saved_frames + count,
                finished
            ],
        )?;
        if updated == 0 {
            return Err(ClientError::Invalid(
                "the draft was discarded or sent while it was recorded".into(),
            ));
        }
        if count > 0 {
            tx.execute(
                "INSERT INTO voice_draft_pieces (draft_id, seq, frames, levels)
                 VALUES (?1, ?2, ?3, ?4)",
                params![self.draft, self.seq, frames, levels],
            )?;
        }
        tx.commit()?;
        drop(db);
        self.seq += 1;
        self.saved_frames += count;
        self.unsaved.clear();
        Ok(())
    }

    /// Ends the recording: the last sound flushed and saved.
    pub fn finish(mut self) -> Result<VoiceDraft> {
        let mut rest = Vec::new();
        self.encoder.finish(&mut rest)?;
        self.unsaved.extend(rest);
        self.save(true)?;
        self.client.voice_draft(self.draft)
    }
}

/// Plays `ogg` at `speed`: mono samples at 48 kHz handed to `sink` as
/// they are decoded. Returns how many were handed over.
pub fn play(ogg: &[u8], speed: f32, mut sink: impl FnMut(&[f32]) -> Result<()>) -> Result<u64> {
    let mut stretch = voice::stretch::Stretch::new(speed);
    let mut out = Vec::new();
    let mut played = 0u64;
    voice::decode(ogg, MAX_PLAYED_MS, |pcm| {
        out.clear();
        stretch.push(pcm, &mut out);
        played += out.len() as u64;
        sink(&out)
    })?;
    out.clear();
    stretch.finish(&mut out);
    played += out.len() as u64;
    sink(&out)?;
    Ok(played)
}

fn draft_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<VoiceDraft> {
    let pre_skip: u64 = row.get(2)?;
    let samples: u64 = row.get(3)?;
    let frames: u64 = row.get(4)?;
    let end = (pre_skip + samples).min(frames * FRAME as u64);
    Ok(VoiceDraft {
        id: row.get(0)?,
        created_at: row.get(1)?,
        duration_ms: (end.saturating_sub(pre_skip) * 1000 / u64::from(SAMPLE_RATE)) as u32,
        finished: row.get(5)?,
    })
}

const DRAFT_COLUMNS: &str = "id, created_at, pre_skip, samples, frames, finished";

impl Client {
    /// Starts recording a voice note into a new draft.
    pub fn record_voice(&self) -> Result<Recording> {
        let encoder = Encoder::new()?;
        let db = self.db();
        db.execute(
            "INSERT INTO voice_drafts (created_at, pre_skip) VALUES (?1, ?2)",
            params![self.now(), encoder.pre_skip()],
        )?;
        let draft = db.last_insert_rowid();
        drop(db);
        Ok(Recording {
            client: self.clone(),
            draft,
            encoder,
            unsaved: Vec::new(),
            saved_frames: 0,
            seq: 0,
            level: 0,
        })
    }

    /// This device's voice note drafts, oldest first.
    pub fn voice_drafts(&self) -> Result<Vec<VoiceDraft>> {
        let db = self.db();
        let mut statement = db.prepare(&format!(
            "SELECT {DRAFT_COLUMNS} FROM voice_drafts ORDER BY id"
        ))?;
        let rows = statement.query_map([], draft_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One draft.
    pub fn voice_draft(&self, id: i64) -> Result<VoiceDraft> {
        self.db()
            .query_row(
                &format!("SELECT {DRAFT_COLUMNS} FROM voice_drafts WHERE id = ?1"),
                [id],
                draft_row,
            )
            .optional()?
            .ok_or_else(|| ClientError::Invalid(format!("no voice note draft {id}")))
    }

    /// Deletes a draft and every piece of it.
    pub fn discard_voice_draft(&self, id: i64) -> Result<()> {
        match self
            .db()
            .execute("DELETE FROM voice_drafts WHERE id = ?1", [id])?
        {
            0 => Err(ClientError::Invalid(format!("no voice note draft {id}"))),
            _ => Ok(()),
        }
    }

    /// A draft as a note: its Ogg stream, length and waveform.
    fn draft_note(&self, id: i64) -> Result<Note> {
        let mut db = self.db();
        // One read of the draft, however far a recording has got.
        let db = db.transaction()?;
        let (pre_skip, samples): (u16, u64) = db
            .query_row(
                "SELECT pre_skip, samples FROM voice_drafts WHERE id = ?1",
                [id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| ClientError::Invalid(format!("no voice note draft {id}")))?;
        let mut statement = db.prepare(
            "SELECT frames, levels FROM voice_draft_pieces WHERE draft_id = ?1 ORDER BY seq",
        )?;
        let mut packets: Vec<Vec<u8>> = Vec::new();
        let mut levels = Vec::new();
        let corrupt = || ClientError::Store("a voice note draft's piece".into());
        for piece in statement.query_map([id], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
        })? {
            let (frames, piece_levels) = piece?;
            let mut rest = &frames[..];
            while !rest.is_empty() {
                let (len, tail) = rest.split_first_chunk::<2>().ok_or_else(corrupt)?;
                let len = usize::from(u16::from_le_bytes(*len));
                if tail.len() < len {
                    return Err(corrupt());
                }
                packets.push(tail[..len].to_vec());
                rest = &tail[len..];
            }
            levels.extend_from_slice(&piece_levels);
        }
        drop(statement);
        db.commit()?;
        voice::assemble(
            packets.iter().map(Vec::as_slice),
            &levels,
            pre_skip,
            samples,
        )
    }

    /// Sends draft `id` into `conversation` as a voice note; the draft
    /// goes once the message is sent.
    pub async fn send_voice_draft(
        &self,
        conversation: &ConversationId,
        id: i64,
        caption: Option<&str>,
    ) -> Result<Message> {
        let note = self.draft_note(id)?;
        self.send_note(conversation, note, caption, Some(id)).await
    }

    /// Sends an audio file as a voice note: a WAV file (encoded here) or
    /// an Ogg Opus file (decoded and encoded again, so nothing of its
    /// maker's tags or other streams goes with it). At most 15 minutes.
    pub async fn send_voice_file(
        &self,
        conversation: &ConversationId,
        path: &Path,
        caption: Option<&str>,
    ) -> Result<Message> {
        self.group_id_of(conversation)?;
        let path = path.to_owned();
        let note = tokio::task::spawn_blocking(move || note_of_file(&path))
            .await
            .map_err(|e| ClientError::Store(e.to_string()))??;
        self.send_note(conversation, note, caption, None).await
    }

    /// Sends `note`; `draft`, if it came from one, goes when its upload is
    /// recorded (from then on `resume_uploads` finishes it, never a second
    /// send of the draft).
    async fn send_note(
        &self,
        conversation: &ConversationId,
        note: Note,
        caption: Option<&str>,
        draft: Option<i64>,
    ) -> Result<Message> {
        let caption = caption.unwrap_or_default().to_owned();
        if caption.len() > MAX_CAPTION_BYTES {
            return Err(ClientError::Invalid(format!(
                "a caption holds at most {MAX_CAPTION_BYTES} bytes"
            )));
        }
        let Note {
            ogg,
            duration_ms,
            waveform,
        } = note;
        let outgoing = Outgoing {
            name: voice::VOICE_NAME.into(),
            mime_type: voice::VOICE_MIME.into(),
            caption,
            size: ogg.len() as u64,
            source: Source::Bytes(ogg),
            thumbnail: Vec::new(),
            duration_ms,
            waveform,
            draft,
        };
        self.send_outgoing(conversation, outgoing).await
    }

    /// A voice note's Ogg stream, to hand to [`play`]: a draft's, or a
    /// message's (fetched first if it is not here yet). Only in memory.
    pub async fn voice_note(&self, source: VoiceSource) -> Result<Zeroizing<Vec<u8>>> {
        match source {
            VoiceSource::Draft(id) => {
                let note = self.draft_note(id)?;
                Ok(Zeroizing::new(note.ogg))
            }
            VoiceSource::Message(id) => {
                let mime_type: Option<String> = self
                    .db()
                    .query_row(
                        "SELECT mime_type FROM attachments WHERE message_id = ?1",
                        [id],
                        |row| row.get(0),
                    )
                    .optional()?;
                match mime_type {
                    Some(mime) if mime.starts_with("audio/ogg") => {}
                    Some(mime) => {
                        return Err(ClientError::Invalid(format!(
                            "message {id}'s file is not a voice note ({mime}): save it instead"
                        )));
                    }
                    None => {
                        return Err(ClientError::Invalid(format!(
                            "message {id} carries no file"
                        )));
                    }
                }
                let (_, bytes) = self.open_attachment(id, MAX_PLAYED_BYTES).await?;
                Ok(bytes)
            }
        }
    }
}

/// A WAV or Ogg Opus file as a note, by what its first bytes say.
fn note_of_file(path: &Path) -> Result<Note> {
    let file = std::fs::File::open(path).map_err(|e| ClientError::Invalid(e.to_string()))?;
    let mut input = std::io::BufReader::new(file);
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClientError::Invalid(e.to_string())),
        }
    }
    let chained = std::io::Read::chain(&head[..got], input);
    if head.starts_with(b"RIFF") && head[8..12] == *b"WAVE" {
        // Encoded as it is read: a block of the audio in memory at a time.
        let mut wav = voice::WavPcm::new(chained)?;
        let mut encoder = Encoder::new()?;
        let (mut block, mut frames) = (Vec::new(), Vec::new());
        while wav.next_block(&mut block)? {
            encoder.push(&block, &mut frames)?;
            block.clear();
        }
        return encoder.into_note(frames);
    }
    if head.starts_with(b"OggS") {
        let mut encoder = Encoder::new()?;
        let mut frames = Vec::new();
        voice::decode(chained, u64::from(MAX_VOICE_MS), |pcm| {
            encoder.push(pcm, &mut frames)
        })?;
        return encoder.into_note(frames);
    }
    Err(ClientError::Invalid(
        "a voice note is made from a WAV or an Ogg Opus file; send other audio with \
         `umbra send-file`"
            .into(),
    ))
}
