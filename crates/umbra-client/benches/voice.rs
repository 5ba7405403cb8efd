//! What a voice note costs a device, per 10 seconds of audio: encoding it
//! (recording), decoding it (playing, and what refusing a hostile note
//! costs: decoding is bounded at 16 minutes, so the worst is 96 times the
//! decode figure), and playing it faster (WSOLA at 1.5x and 2x, on top of
//! decoding). Run with `cargo bench -p umbra-client --bench voice`; the
//! figures and the machine are in `docs/benchmarks-voice.md`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use umbra_client::voice::{self, SAMPLE_RATE, stretch::Stretch};

/// Ten seconds of something like speech: a 150 Hz voice with its first
/// eight harmonics, opening and closing four times a second, over a
/// little noise.
fn speech() -> Vec<f32> {
    let mut noise = 0x2545_f491_u32;
    (0..10 * SAMPLE_RATE as usize)
        .map(|i| {
            let t = i as f32 / SAMPLE_RATE as f32;
            let voice: f32 = (1..=8)
                .map(|h| (2.0 * std::f32::consts::PI * 150.0 * h as f32 * t).sin() / h as f32)
                .sum();
            let syllables = 0.5 + 0.5 * (2.0 * std::f32::consts::PI * 4.0 * t).sin();
            noise ^= noise << 13;
            noise ^= noise >> 17;
            noise ^= noise << 5;
            let hiss = (noise as f32 / u32::MAX as f32 - 0.5) * 0.02;
            0.25 * voice * syllables + hiss
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let pcm = speech();
    let note = voice::encode(&pcm).expect("encodes");
    let mut group = c.benchmark_group("voice_10s");
    group.sample_size(20);
    group.bench_function("encode", |b| {
        b.iter(|| voice::encode(black_box(&pcm)).expect("encodes"))
    });
    group.bench_function("decode", |b| {
        b.iter(|| voice::decode(black_box(&note.ogg[..]), 60_000, |_| Ok(())).expect("decodes"))
    });
    for speed in [1.5f32, 2.0] {
        group.bench_function(format!("stretch_{speed}x"), |b| {
            b.iter(|| {
                let mut stretch = Stretch::new(speed);
                let mut out = Vec::with_capacity(pcm.len());
                for piece in black_box(&pcm).chunks(960) {
                    stretch.push(piece, &mut out);
                }
                stretch.finish(&mut out);
                out
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
