//! Voice notes over the real server with real clients, from generated
//! audio (never a microphone): recorded into a draft that survives an
//! interruption, listened back to, sent, and played by the recipient at
//! 1x and 2x; and what Umbra writes decodes with the reference decoder.

mod common;

use common::{Device, befriend};
use umbra_client::voice::{self, SAMPLE_RATE, WAVEFORM_BARS};
use umbra_client::{VoiceSource, play_voice};

/// `seconds` of a tone at `hz`, then as long of silence.
fn tone_then_silence(hz: f32, seconds: f32) -> Vec<f32> {
    let n = (seconds * SAMPLE_RATE as f32) as usize;
    let mut pcm: Vec<f32> = (0..n)
        .map(|i| 0.5 * (2.0 * std::f32::consts::PI * hz * i as f32 / SAMPLE_RATE as f32).sin())
        .collect();
    pcm.resize(2 * n, 0.0);
    pcm
}

fn pitch(pcm: &[f32]) -> f32 {
    let crossings = pcm
        .windows(2)
        .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
        .count();
    crossings as f32 / 2.0 / (pcm.len() as f32 / SAMPLE_RATE as f32)
}

fn played(ogg: &[u8], speed: f32) -> Vec<f32> {
    let mut out = Vec::new();
    play_voice(ogg, speed, |pcm| {
        out.extend_from_slice(pcm);
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn the_reference_decoder_plays_what_umbra_makes() {
    let note = voice::encode(&tone_then_silence(440.0, 1.0)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (opus, wav) = (dir.path().join("note.opus"), dir.path().join("note.wav"));
    std::fs::write(&opus, &note.ogg).unwrap();
    let status = std::process::Command::new("opusdec")
        .args(["--quiet", "--rate", "48000", "--force-wav"])
        .arg(&opus)
        .arg(&wav)
        .status()
        .expect("opusdec (Debian's opus-tools; .ci/run installs it)");
    assert!(status.success());
    let mut reader = hound::WavReader::open(&wav).unwrap();
    assert_eq!(reader.spec().channels, 1);
    let pcm: Vec<f32> = reader
        .samples::<i16>()
        .map(|s| f32::from(s.unwrap()) / 32768.0)
        .collect();
    // As long as what went in (opusdec trims the pre-skip and the end),
    // the tone where it was and silence after it.
    assert_eq!(pcm.len(), 96_000);
    assert!((pitch(&pcm[4_800..43_200]) - 440.0).abs() < 5.0);
    assert!(pcm[52_800..].iter().all(|s| s.abs() < 0.01));
}

#[tokio::test]
async fn a_recording_cut_off_is_kept_and_a_sent_note_plays_on_the_other_device() {
    let server = common::TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;

    // A recording of 3.3 s, fed as a microphone would (20 ms at a time),
    // then cut off: no `finish`, and the device closed.
    let mut audio = tone_then_silence(300.0, 1.5);
    audio.resize(audio.len() + 14_400, 0.0);
    let mut recording = alice.client.record_voice().unwrap();
    let draft = recording.draft_id();
    for piece in audio.chunks(960) {
        recording.push(piece).unwrap();
    }
    drop(recording);
    let alice = alice.reopen().await;
    let drafts = alice.client.voice_drafts().unwrap();
    assert_eq!(drafts.len(), 1);
    assert!(!drafts[0].finished);
    // Every whole half second was saved: of 3.3 s, 3 s (less the
    // encoder's delay); at most half a second is lost.
    assert!(
        (2_950..=3_000).contains(&drafts[0].duration_ms),
        "{drafts:?}"
    );

    // Listened back to before sending, at 1x and 2x.
    let draft_ogg = alice
        .client
        .voice_note(VoiceSource::Draft(draft))
        .await
        .unwrap();
    let back = played(&draft_ogg, 1.0);
    assert!((pitch(&back[4_800..64_800]) - 300.0).abs() < 5.0);
    let fast = played(&draft_ogg, 2.0);
    assert_eq!(fast.len(), (back.len() as f32 / 2.0).round() as usize);
    assert!((pitch(&fast[2_400..31_200]) - 300.0).abs() < 8.0);

    // Sent: the draft goes, the note arrives with its length and waveform.
    let sent = alice
        .client
        .send_voice_draft(&conversation, draft, None)
        .await
        .unwrap();
    assert!(alice.client.voice_drafts().unwrap().is_empty());
    let info = sent.attachment.clone().unwrap();
    assert_eq!(info.mime_type, "audio/ogg");
    assert_eq!(info.duration_ms, drafts[0].duration_ms);
    assert_eq!(info.waveform.len(), WAVEFORM_BARS);
    let received = bob.next_message().await;
    let file = received.attachment.clone().unwrap();
    assert_eq!(file.duration_ms, info.duration_ms);
    assert_eq!(file.waveform, info.waveform);
    // Loud first half, silent second half.
    assert!(
        file.waveform[2..30].iter().all(|&l| l > 180),
        "{:?}",
        file.waveform
    );
    assert!(
        file.waveform[34..].iter().all(|&l| l < 20),
        "{:?}",
        file.waveform
    );
    let ogg = bob
        .client
        .voice_note(VoiceSource::Message(received.id))
        .await
        .unwrap();
    assert_eq!(&ogg[..], &draft_ogg[..]);
    let heard = played(&ogg, 1.5);
    assert_eq!(heard.len(), (back.len() as f32 / 1.5).round() as usize);
    assert!((pitch(&heard[4_800..40_000]) - 300.0).abs() < 8.0);
}

#[tokio::test]
async fn a_draft_deleted_while_it_is_recorded_stops_the_recording_with_a_clear_error() {
    let server = common::TestServer::start().await;
    let alice = Device::activate(&server).await;
    // 1.2 s: the first 0.6 s is saved as it is pushed, the next would be.
    let audio = tone_then_silence(300.0, 0.6);
    let mut recording = alice.client.record_voice().unwrap();
    recording.push(&audio[..28_800]).unwrap();
    alice
        .client
        .discard_voice_draft(recording.draft_id())
        .unwrap();
    let refused = recording.push(&audio[28_800..]).unwrap_err();
    assert!(
        matches!(&refused, umbra_client::ClientError::Invalid(why) if why.contains("discarded")),
        "{refused:?}"
    );
    assert!(alice.client.voice_drafts().unwrap().is_empty());
}

#[tokio::test]
async fn an_audio_file_goes_as_a_voice_note_without_its_tags() {
    let server = common::TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    let dir = tempfile::tempdir().unwrap();

    // A WAV file at 44.1 kHz, stereo.
    let wav = dir.path().join("memo.wav");
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 44_100,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(&wav, spec).unwrap();
    for i in 0..44_100 * 2 {
        let v = 0.4 * (2.0 * std::f32::consts::PI * 500.0 * i as f32 / 44_100.0).sin();
        writer.write_sample((v * 32767.0) as i16).unwrap();
        writer.write_sample((v * 32767.0) as i16).unwrap();
    }
    writer.finalize().unwrap();
    let sent = alice
        .client
        .send_voice_file(&conversation, &wav, Some("listen"))
        .await
        .unwrap();
    assert_eq!(sent.attachment.as_ref().unwrap().duration_ms, 2_000);
    assert_eq!(sent.body, "listen");
    let received = bob.next_message().await;
    let ogg = bob
        .client
        .voice_note(VoiceSource::Message(received.id))
        .await
        .unwrap();
    let heard = played(&ogg, 1.0);
    assert_eq!(heard.len(), 96_000);
    assert!((pitch(&heard[4_800..91_200]) - 500.0).abs() < 6.0);

    // An Ogg Opus file whose tags say where it was made: decoded and
    // encoded again, so none of it travels.
    let secret = b"LOCATION=52.37,4.89";
    let tagged = opus_tags_with(secret);
    let opus = dir.path().join("memo.opus");
    std::fs::write(&opus, &tagged).unwrap();
    assert!(tagged.windows(secret.len()).any(|w| w == secret));
    alice
        .client
        .send_voice_file(&conversation, &opus, None)
        .await
        .unwrap();
    let received = bob.next_message().await;
    // (That stream was not trimmed at its end: a second less its delay.)
    let duration = received.attachment.as_ref().unwrap().duration_ms;
    assert!((980..=1_000).contains(&duration), "{duration}");
    let ogg = bob
        .client
        .voice_note(VoiceSource::Message(received.id))
        .await
        .unwrap();
    assert!(!ogg.windows(secret.len()).any(|w| w == secret));

    // Not audio Umbra reads: refused, nothing sent.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    assert!(
        alice
            .client
            .send_voice_file(&conversation, &text, None)
            .await
            .is_err()
    );
    // A file that is not a voice note is not played as one.
    let sent = alice
        .client
        .send_file(&conversation, &text, None)
        .await
        .unwrap();
    assert!(
        alice
            .client
            .voice_note(VoiceSource::Message(sent.id))
            .await
            .is_err()
    );
}

/// An Ogg Opus stream of a second of tone whose comment header carries
/// `tag`, written by opusenc-style means: the stream's own writer.
fn opus_tags_with(tag: &[u8]) -> Vec<u8> {
    use opus_pure::{Application, OggOpusWriter, OpusEncoder, OpusHead, OpusTags};
    let mut encoder = OpusEncoder::new(48_000, 1, Application::Audio).unwrap();
    let head = OpusHead::for_encoder(&encoder, 48_000);
    let mut tags = OpusTags::new();
    let tag = std::str::from_utf8(tag).unwrap();
    let (name, value) = tag.split_once('=').unwrap();
    tags.push(name, value).unwrap();
    let mut writer = OggOpusWriter::with_tags(Vec::new(), head, tags).unwrap();
    let pcm = tone_then_silence(400.0, 0.5);
    let mut packet = vec![0u8; 4000];
    for frame in pcm.chunks_exact(960) {
        let n = encoder.encode(frame, 960, &mut packet).unwrap();
        writer.write_packet(&packet[..n]).unwrap();
    }
    writer.finish().unwrap()
}
