use super::stretch::Stretch;
use super::*;

/// A WAV file's samples at 48 kHz, all of them ([`WavPcm`] block by block).
fn read_wav(input: impl Read) -> Result<Vec<f32>> {
    let mut wav = WavPcm::new(input)?;
    let mut out = Vec::new();
    while wav.next_block(&mut out)? {}
    Ok(out)
}

/// A 440 Hz tone at half scale, `frames` long, 16-bit, in a WAV file.
fn tone_wav(channels: u16, rate: u32, frames: u32) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut bytes = std::io::Cursor::new(Vec::new());
    {
        let mut writer = hound::WavWriter::new(&mut bytes, spec).unwrap();
        for i in 0..frames {
            let v = (0.5
                * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate as f32).sin()
                * 32767.0) as i16;
            for _ in 0..channels {
                writer.write_sample(v).unwrap();
            }
        }
        writer.finalize().unwrap();
    }
    bytes.into_inner()
}

/// `seconds` of a sine at `hz`, amplitude `amplitude`, at 48 kHz.
pub(crate) fn tone(hz: f32, seconds: f32, amplitude: f32) -> Vec<f32> {
    let n = (seconds * SAMPLE_RATE as f32) as usize;
    (0..n)
        .map(|i| {
            amplitude * (2.0 * std::f32::consts::PI * hz * i as f32 / SAMPLE_RATE as f32).sin()
        })
        .collect()
}

/// The pitch of a steady tone, from its zero crossings.
fn pitch(pcm: &[f32]) -> f32 {
    let crossings = pcm
        .windows(2)
        .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
        .count();
    crossings as f32 / 2.0 / (pcm.len() as f32 / SAMPLE_RATE as f32)
}

fn decoded(ogg: &[u8]) -> Vec<f32> {
    let mut pcm = Vec::new();
    decode(ogg, 60_000, |s| {
        pcm.extend_from_slice(s);
        Ok(())
    })
    .unwrap();
    pcm
}

#[test]
fn a_note_comes_back_as_long_and_at_the_pitch_it_was_made() {
    let note = encode(&tone(440.0, 1.5, 0.5)).unwrap();
    assert_eq!(note.duration_ms, 1500);
    let pcm = decoded(&note.ogg);
    // Gapless: the encoder's delay is trimmed, the padding cut off.
    assert_eq!(pcm.len(), 72_000);
    let middle = &pcm[4_800..67_200];
    assert!((pitch(middle) - 440.0).abs() < 5.0, "{}", pitch(middle));
    let rms = (middle.iter().map(|s| s * s).sum::<f32>() / middle.len() as f32).sqrt();
    assert!((rms - 0.354).abs() < 0.05, "rms {rms}");
    assert_eq!(inspect(&note.ogg).unwrap().0, 1500);
}

#[test]
fn the_waveform_follows_the_sound() {
    let mut pcm = vec![0.0; 48_000];
    pcm.extend(tone(300.0, 1.0, 0.8));
    let note = encode(&pcm).unwrap();
    assert_eq!(note.waveform.len(), WAVEFORM_BARS);
    let (quiet, loud) = note.waveform.split_at(WAVEFORM_BARS / 2);
    assert!(quiet[..30].iter().all(|&l| l == 0), "{quiet:?}");
    assert!(loud[2..].iter().all(|&l| l > 200), "{loud:?}");
    // The sender's waveform and one read back from the stream agree.
    let (_, read) = inspect(&note.ogg).unwrap();
    let close = note
        .waveform
        .iter()
        .zip(&read)
        .filter(|(a, b)| a.abs_diff(**b) <= 16)
        .count();
    assert!(
        close >= WAVEFORM_BARS - 4,
        "{:?} vs {read:?}",
        note.waveform
    );
}

#[test]
fn a_recording_cut_off_keeps_what_was_encoded() {
    let mut encoder = Encoder::new().unwrap();
    let mut frames = Vec::new();
    encoder.push(&tone(200.0, 1.0, 0.5), &mut frames).unwrap();
    // No `finish`: the process died here.
    assert_eq!(frames.len(), 50);
    let levels: Vec<u8> = frames.iter().map(|f| f.level).collect();
    let note = assemble(
        frames.iter().map(|f| f.packet.as_slice()),
        &levels,
        encoder.pre_skip(),
        encoder.samples(),
    )
    .unwrap();
    let expected = (48_000 - u64::from(encoder.pre_skip())) * 1000 / 48_000;
    assert_eq!(u64::from(note.duration_ms), expected);
    assert_eq!(
        decoded(&note.ogg).len() as u64,
        48_000 - u64::from(encoder.pre_skip())
    );
}

#[test]
fn faster_playback_is_shorter_and_keeps_the_pitch() {
    let input = tone(250.0, 2.0, 0.5);
    for speed in [1.5f32, 2.0] {
        let mut stretch = Stretch::new(speed);
        let mut out = Vec::new();
        // In uneven pieces, as a decoder hands them over.
        for piece in input.chunks(777) {
            stretch.push(piece, &mut out);
        }
        stretch.finish(&mut out);
        let expected = (input.len() as f32 / speed).round() as usize;
        assert_eq!(out.len(), expected, "speed {speed}");
        let middle = &out[4_800..out.len() - 4_800];
        assert!(
            (pitch(middle) - 250.0).abs() < 8.0,
            "speed {speed}: {}",
            pitch(middle)
        );
        // No seams: the level stays even through the note.
        let levels: Vec<u8> = middle.chunks(960).map(level).collect();
        let (low, high) = (levels.iter().min().unwrap(), levels.iter().max().unwrap());
        assert!(high - low <= 12, "speed {speed}: {levels:?}");
    }
    let mut same = Stretch::new(1.0);
    let mut out = Vec::new();
    same.push(&input, &mut out);
    same.finish(&mut out);
    assert_eq!(out, input);
}

#[test]
fn what_is_not_a_note_is_refused_without_a_crash() {
    let note = encode(&tone(440.0, 0.5, 0.5)).unwrap();
    let mut noise = vec![0u8; 4096];
    getrandom::getrandom(&mut noise).unwrap();
    assert!(decode(&noise[..], 60_000, |_| Ok(())).is_err());
    assert!(decode(&b""[..], 60_000, |_| Ok(())).is_err());
    // Every cut of a real note is refused or decodes what it holds.
    for cut in (0..note.ogg.len()).step_by(7) {
        let mut got = 0;
        if decode(&note.ogg[..cut], 60_000, |pcm| {
            got += pcm.len();
            Ok(())
        })
        .is_ok()
        {
            assert!(got <= 24_000, "a cut note decodes to no more than the note");
        }
    }
    // Bytes flipped inside the audio pages: the page checksum refuses.
    let mut flipped = note.ogg.clone();
    let at = flipped.len() - 20;
    flipped[at] ^= 0x55;
    assert!(decode(&flipped[..], 60_000, |_| Ok(())).is_err());
    // A note longer than asked for is refused, not decoded to the end.
    assert!(decode(&note.ogg[..], 100, |_| Ok(())).is_err());
}

#[test]
fn wav_files_of_any_common_shape_become_notes() {
    let bytes = tone_wav(2, 16_000, 16_000);
    let pcm = read_wav(&bytes[..]).unwrap();
    assert_eq!(pcm.len(), 48_000);
    assert!((pitch(&pcm) - 440.0).abs() < 5.0);
    assert!(read_wav(&b"RIFF\x00\x00\x00\x00WAVE"[..]).is_err());
}

#[test]
fn a_wav_file_is_read_a_block_at_a_time() {
    // 60 s of stereo at 44.1 kHz: 5 million samples in, 2.9 million out.
    let bytes = tone_wav(2, 44_100, 44_100 * 60);
    let mut wav = WavPcm::new(&bytes[..]).unwrap();
    let (mut block, mut all, mut blocks) = (Vec::new(), Vec::new(), 0);
    while wav.next_block(&mut block).unwrap() {
        assert!(
            block.len() <= 4_800 + 2,
            "a block of {} samples",
            block.len()
        );
        all.extend_from_slice(&block);
        block.clear();
        blocks += 1;
    }
    assert!(!wav.next_block(&mut block).unwrap() && block.is_empty());
    assert_eq!(all.len(), 48_000 * 60);
    assert!(blocks >= 600, "{blocks} blocks");
    // The tone at its pitch from the first second to the last, across
    // every block's seam.
    for second in [
        &all[..48_000],
        &all[30 * 48_000..31 * 48_000],
        &all[59 * 48_000..],
    ] {
        assert!((pitch(second) - 440.0).abs() < 5.0);
    }
}

/// Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected), over a page whose
/// checksum field is zero.
fn ogg_crc(page: &[u8]) -> u32 {
    let mut crc = 0u32;
    for &byte in page {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// `ogg` with every audio page's granule position set to `granule` (the
/// checksums made right again): a stream that says it holds nothing.
fn with_granules(ogg: &[u8], granule: i64) -> Vec<u8> {
    let mut out = ogg.to_vec();
    let mut at = 0;
    let mut page = 0;
    while at + 27 <= out.len() {
        assert_eq!(&out[at..at + 4], b"OggS");
        let segments = usize::from(out[at + 26]);
        let body: usize = out[at + 27..at + 27 + segments]
            .iter()
            .map(|&l| usize::from(l))
            .sum();
        let end = at + 27 + segments + body;
        if page >= 2 {
            out[at + 6..at + 14].copy_from_slice(&granule.to_le_bytes());
            out[at + 22..at + 26].fill(0);
            let crc = ogg_crc(&out[at..end]);
            out[at + 22..at + 26].copy_from_slice(&crc.to_le_bytes());
        }
        at = end;
        page += 1;
    }
    out
}

#[test]
fn a_stream_that_says_it_holds_nothing_is_still_bounded_by_what_is_decoded() {
    let note = encode(&tone(440.0, 2.0, 0.5)).unwrap();
    // The rewriting is right: unchanged granules decode as before.
    let same = with_granules(&note.ogg, 0);
    let mut kept = 0;
    let refused = decode(&same[..], 1_000, |pcm| {
        kept += pcm.len();
        Ok(())
    });
    // Two seconds decoded, nothing kept: refused at the one second asked,
    // not decoded to the end (the old count of kept samples never
    // reached its limit).
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(kept, 0);
    assert!(decode(&note.ogg[..], 3_000, |_| Ok(())).is_ok());
}

#[test]
fn a_note_with_no_sound_is_not_made() {
    let mut encoder = Encoder::new().unwrap();
    let mut frames = Vec::new();
    encoder.push(&[0.1; 40], &mut frames).unwrap();
    encoder.finish(&mut frames).unwrap();
    let levels: Vec<u8> = frames.iter().map(|f| f.level).collect();
    let made = assemble(
        frames.iter().map(|f| f.packet.as_slice()),
        &levels,
        encoder.pre_skip(),
        encoder.samples(),
    );
    assert!(made.is_err(), "40 samples are under a millisecond");
    assert!(encode(&[]).is_err());
}

#[test]
fn a_nan_speed_plays_as_recorded() {
    let input = tone(250.0, 0.5, 0.5);
    let mut stretch = Stretch::new(f32::NAN);
    let mut out = Vec::new();
    stretch.push(&input, &mut out);
    stretch.finish(&mut out);
    assert_eq!(out, input);
}

#[test]
fn wav_files_of_every_sample_format_are_read() {
    for (bits, format) in [
        (8, hound::SampleFormat::Int),
        (24, hound::SampleFormat::Int),
        (32, hound::SampleFormat::Int),
        (32, hound::SampleFormat::Float),
    ] {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 44_100,
            bits_per_sample: bits,
            sample_format: format,
        };
        let mut bytes = std::io::Cursor::new(Vec::new());
        {
            let mut writer = hound::WavWriter::new(&mut bytes, spec).unwrap();
            for i in 0..44_100 {
                let v = 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 44_100.0).sin();
                match (bits, format) {
                    (_, hound::SampleFormat::Float) => writer.write_sample(v).unwrap(),
                    (8, _) => writer.write_sample((v * 127.0) as i8).unwrap(),
                    (24, _) => writer.write_sample((v * 8_388_607.0) as i32).unwrap(),
                    _ => writer.write_sample((v * 2_147_483_647.0) as i32).unwrap(),
                }
            }
            writer.finalize().unwrap();
        }
        let pcm = read_wav(&bytes.get_ref()[..]).unwrap();
        assert_eq!(pcm.len(), 48_000, "{bits}-bit {format:?}");
        assert!((pitch(&pcm) - 440.0).abs() < 5.0, "{bits}-bit {format:?}");
        let rms = (pcm.iter().map(|s| s * s).sum::<f32>() / pcm.len() as f32).sqrt();
        assert!(
            (rms - 0.354).abs() < 0.02,
            "{bits}-bit {format:?}: rms {rms}"
        );
    }
}
