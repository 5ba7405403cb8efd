//! Voice notes: mono Opus in Ogg (RFC 6716, RFC 7845) at 48 kHz, made and
//! played on the device. This module is the audio side only: encoding a
//! recording frame by frame (each frame's level kept for the meter and the
//! waveform), writing the Ogg stream, reading one back (from this device or
//! another member's), WAV files a person attaches instead of recording,
//! and playback faster than recorded ([`stretch`]). Drafts, sending and
//! playing a message's note are `crate::client::voice`.
//!
//! Everything here runs on bytes another member chose: decoding is bounded
//! (a note is at most [`MAX_VOICE_MS`] long where its length matters), a
//! stream that is not mono or stereo Opus is refused, and a panic inside
//! the codec is a refusal, never a crash.

pub mod stretch;

use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind};

use opus_pure::{
    Application, MAX_PACKET_BYTES, MAX_PACKET_SAMPLES, OggOpusReader, OggOpusWriter, OpusEncoder,
    OpusHead, OpusTags, Trim,
};

use crate::error::{ClientError, Result};

/// The rate every note is made and played at.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one Opus frame: 20 ms.
pub const FRAME: usize = 960;
/// The longest voice note: longer audio goes as a file.
pub const MAX_VOICE_MS: u32 = 15 * 60 * 1000;
/// Bars in the waveform a note carries.
pub const WAVEFORM_BARS: usize = 64;
/// The encoder's bit rate: clear speech, about 240 KB a minute.
pub const BITRATE: i32 = 32_000;
/// What a voice note is sent as.
pub const VOICE_MIME: &str = "audio/ogg";
/// The name a voice note is sent under.
pub const VOICE_NAME: &str = "voice-note.opus";
/// The quietest level the meter shows, in dB below full scale.
const FLOOR_DB: f32 = 60.0;

fn invalid(what: impl std::fmt::Display) -> ClientError {
    ClientError::Invalid(format!("voice note: {what}"))
}

thread_local! {
    static IN_CODEC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside codec work, whose panics are refusals: a
/// front end's panic hook (one that restores the terminal) should let
/// such a panic pass.
pub fn in_codec() -> bool {
    IN_CODEC.with(std::cell::Cell::get)
}

/// Runs codec work, turning a panic inside it into a refusal.
fn guarded<T>(work: impl FnOnce() -> Result<T>) -> Result<T> {
    let was = IN_CODEC.with(|flag| flag.replace(true));
    let outcome = catch_unwind(AssertUnwindSafe(work))
        .unwrap_or_else(|_| Err(invalid("the audio is malformed")));
    IN_CODEC.with(|flag| flag.set(was));
    outcome
}

/// A frame's level, 0 (silence, or below -60 dBFS) to 255 (full scale),
/// from its RMS: what the meter shows and the waveform is made of.
pub fn level(samples: &[f32]) -> u8 {
    if samples.is_empty() {
        return 0;
    }
    let power = samples.iter().map(|s| s * s).sum::<f32>() / samples.len() as f32;
    let db = 10.0 * power.max(1e-12).log10();
    let scaled = (db + FLOOR_DB) / FLOOR_DB * 255.0;
    scaled.clamp(0.0, 255.0) as u8
}

/// The waveform a note carries: [`WAVEFORM_BARS`] bars (fewer for a note
/// of fewer frames), each the loudest frame of its slice of time.
pub fn waveform(levels: &[u8]) -> Vec<u8> {
    let bars = WAVEFORM_BARS.min(levels.len());
    (0..bars)
        .map(|bar| {
            let start = bar * levels.len() / bars;
            let end = ((bar + 1) * levels.len() / bars).max(start + 1);
            levels[start..end].iter().copied().max().unwrap_or(0)
        })
        .collect()
}

/// One encoded frame and its level.
#[derive(Clone)]
pub struct Frame {
    pub packet: Vec<u8>,
    pub level: u8,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("bytes", &self.packet.len())
            .finish_non_exhaustive()
    }
}

/// Encodes mono samples at 48 kHz (nominally -1.0 to 1.0) into Opus
/// frames, as they come.
pub struct Encoder {
    opus: OpusEncoder,
    pending: Vec<f32>,
    /// Samples of audio pushed, not counting the silence that flushes.
    samples: u64,
    packet: Vec<u8>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    pub fn new() -> Result<Self> {
        let mut opus = OpusEncoder::new(SAMPLE_RATE as i32, 1, Application::Voip)
            .map_err(|e| invalid(format!("encoder: {e}")))?;
        opus.bitrate_bps = BITRATE;
        Ok(Encoder {
            opus,
            pending: Vec::with_capacity(FRAME),
            samples: 0,
            packet: vec![0; MAX_PACKET_BYTES],
        })
    }

    /// How many samples the encoder runs behind its input (the stream's
    /// pre-skip).
    pub fn pre_skip(&self) -> u16 {
        OpusHead::for_encoder(&self.opus, SAMPLE_RATE).pre_skip
    }

    /// Samples of audio pushed so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Encodes `pcm`, adding each whole frame to `out`; a partial frame
    /// waits for the next push.
    pub fn push(&mut self, pcm: &[f32], out: &mut Vec<Frame>) -> Result<()> {
        self.samples += pcm.len() as u64;
        let mut pcm = pcm;
        while !pcm.is_empty() {
            let take = (FRAME - self.pending.len()).min(pcm.len());
            self.pending.extend_from_slice(&pcm[..take]);
            pcm = &pcm[take..];
            if self.pending.len() == FRAME {
                out.push(self.encode_pending()?);
            }
        }
        Ok(())
    }

    fn encode_pending(&mut self) -> Result<Frame> {
        let level = level(&self.pending);
        let (opus, pending, packet) = (&mut self.opus, &self.pending, &mut self.packet);
        let len = guarded(|| {
            opus.encode(pending, FRAME, packet)
                .map_err(|e| invalid(format!("encoder: {e}")))
        })?;
        self.pending.clear();
        Ok(Frame {
            packet: self.packet[..len].to_vec(),
            level,
        })
    }

    /// Ends the recording: the partial frame, and the encoder's delay
    /// flushed with silence, so the last sound is in the stream.
    pub fn finish(&mut self, out: &mut Vec<Frame>) -> Result<()> {
        let mut silence = usize::from(self.pre_skip());
        while !self.pending.is_empty() || silence > 0 {
            let take = (FRAME - self.pending.len()).min(silence);
            silence -= take;
            self.pending.resize(self.pending.len() + take, 0.0);
            if silence == 0 {
                self.pending.resize(FRAME, 0.0);
            }
            if self.pending.len() == FRAME {
                // (Levels past the audio are left out by `assemble`.)
                out.push(self.encode_pending()?);
            }
        }
        Ok(())
    }

    /// [`Encoder::finish`], and the note made of `frames`, every frame
    /// this encoder made.
    pub fn into_note(mut self, mut frames: Vec<Frame>) -> Result<Note> {
        self.finish(&mut frames)?;
        let levels: Vec<u8> = frames.iter().map(|f| f.level).collect();
        assemble(
            frames.iter().map(|f| f.packet.as_slice()),
            &levels,
            self.pre_skip(),
            self.samples(),
        )
    }
}

/// A voice note ready to send: the Ogg stream and what describes it.
pub struct Note {
    pub ogg: Vec<u8>,
    pub duration_ms: u32,
    pub waveform: Vec<u8>,
}

impl std::fmt::Debug for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Note")
            .field("bytes", &self.ogg.len())
            .field("duration_ms", &self.duration_ms)
            .finish_non_exhaustive()
    }
}

/// The Ogg stream of `frames` (each [`FRAME`] samples), from an encoder
/// with `pre_skip`, holding `samples` of audio: the end is trimmed to
/// the audio (a recording cut off keeps what was encoded).
pub fn assemble<'a>(
    frames: impl IntoIterator<Item = &'a [u8]>,
    levels: &[u8],
    pre_skip: u16,
    samples: u64,
) -> Result<Note> {
    let frames: Vec<&[u8]> = frames.into_iter().collect();
    if frames.is_empty() {
        return Err(invalid("nothing was recorded"));
    }
    let mut frames = frames;
    let encoded = frames.len() as u64 * FRAME as u64;
    let end = (u64::from(pre_skip) + samples).min(encoded);
    let audio = end.saturating_sub(u64::from(pre_skip));
    let duration_ms = audio * 1000 / u64::from(SAMPLE_RATE);
    if duration_ms == 0 {
        return Err(invalid("nothing was recorded"));
    }
    if duration_ms > u64::from(MAX_VOICE_MS) {
        return Err(invalid("longer than 15 minutes: send it as a file"));
    }
    // The frames that hold the audio (the last one cut to its end).
    frames.truncate(end.div_ceil(FRAME as u64) as usize);
    let mut head = OpusHead::new(1, SAMPLE_RATE).map_err(invalid)?;
    head.pre_skip = pre_skip;
    let mut tags = OpusTags::new();
    // No encoder name or date: nothing about the device travels.
    tags.vendor = "umbra".into();
    let mut writer = OggOpusWriter::with_tags(Vec::new(), head, tags).map_err(invalid)?;
    let last = frames.len() - 1;
    for (i, packet) in frames.into_iter().enumerate() {
        if i == last {
            let duration = end.saturating_sub(writer.granule() as u64).max(1);
            writer
                .write_packet_with_duration(packet, duration as u32)
                .map_err(invalid)?;
        } else {
            writer.write_packet(packet).map_err(invalid)?;
        }
    }
    let ogg = writer.finish().map_err(invalid)?;
    let levels = &levels[..levels.len().min(audio.div_ceil(FRAME as u64) as usize)];
    Ok(Note {
        ogg,
        duration_ms: duration_ms as u32,
        waveform: waveform(levels),
    })
}

/// Encodes mono samples at 48 kHz as a whole note.
pub fn encode(pcm: &[f32]) -> Result<Note> {
    let mut encoder = Encoder::new()?;
    let mut frames = Vec::new();
    encoder.push(pcm, &mut frames)?;
    encoder.into_note(frames)
}

/// Decodes an Ogg Opus stream (mono or stereo, mixed to mono) to samples
/// at 48 kHz, handing them to `sink` a packet's worth at a time; at most
/// `max_ms` of audio is decoded (past it, an error), counted as the
/// decoder produces it, before the stream's own trimming (which a hostile
/// stream could make keep nothing of hours of decoding). Returns the
/// number of samples handed over.
pub fn decode(
    ogg: impl Read,
    max_ms: u64,
    mut sink: impl FnMut(&[f32]) -> Result<()>,
) -> Result<u64> {
    guarded(|| {
        let mut reader = OggOpusReader::new(ogg).map_err(invalid)?;
        let head = reader.head().clone();
        let channels = usize::from(head.channel_count);
        if head.mapping_family != 0 || !(1..=2).contains(&channels) {
            return Err(invalid("only mono or stereo Opus is played"));
        }
        let mut decoder = head.decoder(SAMPLE_RATE as i32).map_err(invalid)?;
        let mut trim = Trim::new(&head, SAMPLE_RATE as i32, channels).map_err(invalid)?;
        let max_samples = max_ms.saturating_mul(u64::from(SAMPLE_RATE)) / 1000;
        let mut block = vec![0.0f32; MAX_PACKET_SAMPLES * channels];
        let mut mono = Vec::with_capacity(MAX_PACKET_SAMPLES);
        let mut total = 0u64;
        // What was decoded: the audio, its pre-skip, and a packet's worth
        // of end trimming at most.
        let budget = max_samples + u64::from(head.pre_skip) + MAX_PACKET_SAMPLES as u64;
        let mut decoded = 0u64;
        for packet in reader.packets() {
            let packet = packet.map_err(invalid)?;
            let n = decoder
                .decode(&packet.data, MAX_PACKET_SAMPLES, &mut block)
                .map_err(invalid)?;
            decoded += n as u64;
            if decoded > budget {
                return Err(invalid(format!(
                    "longer than {} minutes",
                    max_ms.div_ceil(60_000)
                )));
            }
            let kept = trim.keep(&packet, &block[..n * channels]);
            mono.clear();
            mono.extend(
                kept.chunks_exact(channels)
                    .map(|s| (s.iter().sum::<f32>() / channels as f32).clamp(-1.0, 1.0)),
            );
            total += mono.len() as u64;
            if total > max_samples {
                return Err(invalid(format!(
                    "longer than {} minutes",
                    max_ms.div_ceil(60_000)
                )));
            }
            sink(&mono)?;
        }
        Ok(total)
    })
}

/// What a note holds, read from its stream: its length and waveform
/// (the tests compare it with what the sender said).
#[cfg(test)]
pub(crate) fn inspect(ogg: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut levels = Vec::new();
    let mut pending = Vec::with_capacity(FRAME);
    let samples = decode(ogg, u64::from(MAX_VOICE_MS), |pcm| {
        for &s in pcm {
            pending.push(s);
            if pending.len() == FRAME {
                levels.push(level(&pending));
                pending.clear();
            }
        }
        Ok(())
    })?;
    if !pending.is_empty() {
        levels.push(level(&pending));
    }
    if samples == 0 {
        return Err(invalid("it holds no audio"));
    }
    Ok((
        (samples * 1000 / u64::from(SAMPLE_RATE)) as u32,
        waveform(&levels),
    ))
}

/// Samples a block holds (0.1 s at 48 kHz, give or take the resampler's).
const WAV_BLOCK: usize = 4800;

/// A WAV file's audio as mono samples at 48 kHz, mixed and resampled as
/// it is read, a block at a time: only a block is held (a 15-minute file
/// at 48 kHz would be 173 MB).
pub struct WavPcm<R: Read> {
    samples: WavSamples<R>,
    channels: usize,
    resampler: Resampler,
    done: bool,
}

impl<R: Read> std::fmt::Debug for WavPcm<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WavPcm")
            .field("channels", &self.channels)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

enum WavSamples<R: Read> {
    Float(hound::WavIntoSamples<R, f32>),
    Int(hound::WavIntoSamples<R, i32>, f32),
}

impl<R: Read> WavPcm<R> {
    /// Reads the header: 8 to 32-bit integer or 32-bit float, 8 to
    /// 192 kHz, mono or stereo, at most [`MAX_VOICE_MS`].
    pub fn new(input: R) -> Result<Self> {
        let reader = hound::WavReader::new(input).map_err(|e| invalid(format!("WAV: {e}")))?;
        let spec = reader.spec();
        let channels = usize::from(spec.channels);
        if !(1..=2).contains(&channels) {
            return Err(invalid("only mono or stereo WAV files are read"));
        }
        if !(8_000..=192_000).contains(&spec.sample_rate) {
            return Err(invalid("a WAV file's rate must be 8 to 192 kHz"));
        }
        let frames = u64::from(reader.duration());
        if frames * 1000 / u64::from(spec.sample_rate) > u64::from(MAX_VOICE_MS) {
            return Err(invalid("longer than 15 minutes: send it as a file"));
        }
        let samples = match spec.sample_format {
            hound::SampleFormat::Float => WavSamples::Float(reader.into_samples()),
            hound::SampleFormat::Int => WavSamples::Int(
                reader.into_samples(),
                1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32,
            ),
        };
        Ok(WavPcm {
            samples,
            channels,
            resampler: Resampler::new(spec.sample_rate),
            done: false,
        })
    }

    /// Appends the next block of samples to `out`; `false` once the file
    /// has ended (and nothing was appended).
    pub fn next_block(&mut self, out: &mut Vec<f32>) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        let bad = |e: hound::Error| invalid(format!("WAV: {e}"));
        let start = out.len();
        while out.len() - start < WAV_BLOCK {
            let mut frame = 0.0f32;
            for _ in 0..self.channels {
                let sample = match &mut self.samples {
                    WavSamples::Float(samples) => samples.next().map(|s| s.map_err(bad)),
                    WavSamples::Int(samples, scale) => samples
                        .next()
                        .map(|s| s.map(|s| s as f32 * *scale).map_err(bad)),
                };
                match sample {
                    Some(sample) => frame += sample?,
                    // The end (a frame cut short by it is left out).
                    None => {
                        self.resampler.finish(out);
                        self.done = true;
                        return Ok(true);
                    }
                }
            }
            self.resampler.push(frame / self.channels as f32, out);
        }
        Ok(true)
    }
}

/// Samples at one rate brought to 48 kHz as they come (linear
/// interpolation: enough for speech, which the encoder keeps below 12 kHz
/// at this bit rate).
struct Resampler {
    rate: u32,
    /// Input samples per output sample.
    step: f64,
    /// Input not yet passed; `input[0]` is input sample `base`.
    input: Vec<f32>,
    base: u64,
    /// Input samples seen, and output samples made.
    seen: u64,
    made: u64,
}

impl Resampler {
    fn new(rate: u32) -> Self {
        Resampler {
            rate,
            step: f64::from(rate.max(1)) / f64::from(SAMPLE_RATE),
            input: Vec::new(),
            base: 0,
            seen: 0,
            made: 0,
        }
    }

    /// The output sample at input position `at`, the last input repeated
    /// past the end.
    fn at(&self, at: f64) -> f32 {
        let j = (at as u64).saturating_sub(self.base) as usize;
        let last = self.input.len().saturating_sub(1);
        let a = self.input.get(j.min(last)).copied().unwrap_or(0.0);
        let b = self.input.get((j + 1).min(last)).copied().unwrap_or(0.0);
        a + (b - a) * (at - at.floor()) as f32
    }

    fn push(&mut self, sample: f32, out: &mut Vec<f32>) {
        self.input.push(sample);
        self.seen += 1;
        loop {
            let at = self.made as f64 * self.step;
            if at as u64 + 1 >= self.seen {
                break;
            }
            out.push(self.at(at));
            self.made += 1;
        }
        if self.input.len() >= 8192 {
            let keep_from = ((self.made as f64 * self.step) as u64).min(self.seen - 1);
            let drop = (keep_from - self.base) as usize;
            self.input.drain(..drop);
            self.base = keep_from;
        }
    }

    /// The rest: in all, the input's length at 48 kHz.
    fn finish(&mut self, out: &mut Vec<f32>) {
        let total = self.seen * u64::from(SAMPLE_RATE) / u64::from(self.rate.max(1));
        while self.made < total {
            out.push(self.at(self.made as f64 * self.step));
            self.made += 1;
        }
    }
}

/// Samples as 16-bit integers, for a player or a WAV file.
pub fn to_i16(pcm: &[f32], out: &mut Vec<u8>) {
    for &s in pcm {
        let v = (s.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The 44-byte header of a mono 16-bit WAV file at 48 kHz holding
/// `samples` (a stream of unknown length says the largest).
pub fn wav_header(samples: Option<u64>) -> [u8; 44] {
    let data = samples
        .map(|s| (s * 2).min(u64::from(u32::MAX - 36)) as u32)
        .unwrap_or(u32::MAX - 36);
    let mut h = [0u8; 44];
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&(data + 36).to_le_bytes());
    h[8..16].copy_from_slice(b"WAVEfmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
    h[22..24].copy_from_slice(&1u16.to_le_bytes()); // mono
    h[24..28].copy_from_slice(&SAMPLE_RATE.to_le_bytes());
    h[28..32].copy_from_slice(&(SAMPLE_RATE * 2).to_le_bytes());
    h[32..34].copy_from_slice(&2u16.to_le_bytes());
    h[34..36].copy_from_slice(&16u16.to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data.to_le_bytes());
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
