//! Playing a note faster without raising its voice: time-scale
//! modification by WSOLA (waveform-similarity overlap-add; Verhelst and
//! Roelands, 1993). Windows of the input are laid down at a fixed output
//! hop and taken from the input at `speed` times that hop, each shifted by
//! up to [`TOLERANCE`] samples to where it best continues the last one, so
//! pitch is kept and no click is heard at the seams. Streaming: samples in
//! as they are decoded, samples out as soon as they are final.

/// Window length: 40 ms at 48 kHz.
const WINDOW: usize = 1920;
/// Output hop: half a window (Hann windows at half overlap sum to one).
const HOP: usize = WINDOW / 2;
/// How far a window may move from its place to match the last one: 5 ms.
const TOLERANCE: usize = 240;
/// Every how many samples the match is measured (enough for speech, and
/// a quarter of the work).
const STRIDE: usize = 2;

/// The speeds a note is played at.
pub const SPEEDS: [f32; 3] = [1.0, 1.5, 2.0];

pub struct Stretch {
    speed: f64,
    /// Input not yet consumed; `input[0]` is sample number `base`.
    input: Vec<f32>,
    base: u64,
    /// Windows laid down so far.
    windows: u64,
    /// Where the last window was taken from.
    last: Option<u64>,
    /// The second half of the last window, still to be added to.
    tail: Vec<f32>,
    hann: Vec<f32>,
    finished: bool,
}

impl std::fmt::Debug for Stretch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stretch")
            .field("speed", &self.speed)
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

impl Stretch {
    /// Playback at `speed` (between 0.5 and 4; 1 passes samples through).
    pub fn new(speed: f32) -> Self {
        let hann = (0..WINDOW)
            .map(|i| {
                let x = std::f32::consts::PI * i as f32 / WINDOW as f32;
                x.sin() * x.sin()
            })
            .collect();
        Stretch {
            speed: f64::from(if speed.is_finite() {
                speed.clamp(0.5, 4.0)
            } else {
                1.0
            }),
            input: Vec::new(),
            base: 0,
            windows: 0,
            last: None,
            tail: vec![0.0; HOP],
            hann,
            finished: false,
        }
    }

    fn passes_through(&self) -> bool {
        (self.speed - 1.0).abs() < 1e-6
    }

    /// Takes decoded samples; appends to `out` the ones now final.
    pub fn push(&mut self, samples: &[f32], out: &mut Vec<f32>) {
        if self.passes_through() {
            out.extend_from_slice(samples);
            return;
        }
        self.input.extend_from_slice(samples);
        self.run(out);
    }

    /// Ends the input; appends the rest to `out`: in all, the input's
    /// length divided by the speed.
    pub fn finish(&mut self, out: &mut Vec<f32>) {
        if self.passes_through() || self.finished {
            return;
        }
        self.finished = true;
        let end = self.base + self.input.len() as u64;
        let wanted = (end as f64 / self.speed).round() as u64;
        // Silence past the end lets the last windows be laid down.
        self.input
            .resize(self.input.len() + WINDOW + TOLERANCE * 2, 0.0);
        let start = out.len();
        let before = self.windows * HOP as u64;
        while self.windows * (HOP as u64) < wanted && self.lay_window(out) {}
        if self.windows * (HOP as u64) < wanted {
            out.extend_from_slice(&self.tail);
        }
        // What was emitted before this call fell short of `wanted`.
        let keep = wanted.saturating_sub(before) as usize;
        out.truncate(start + keep.min(out.len() - start));
    }

    fn run(&mut self, out: &mut Vec<f32>) {
        while self.lay_window(out) {}
    }

    /// Lays down the next window if the input reaches far enough; emits
    /// the hop of output it makes final.
    fn lay_window(&mut self, out: &mut Vec<f32>) -> bool {
        let ideal = (self.windows as f64 * HOP as f64 * self.speed).round() as u64;
        let end = self.base + self.input.len() as u64;
        if ideal + (TOLERANCE + WINDOW) as u64 > end {
            return false;
        }
        let from = match self.last {
            None => ideal,
            Some(last) => self.best_match(ideal, last + HOP as u64),
        };
        let at = (from - self.base) as usize;
        for i in 0..HOP {
            out.push(self.tail[i] + self.input[at + i] * self.hann[i]);
        }
        for i in 0..HOP {
            self.tail[i] = self.input[at + HOP + i] * self.hann[HOP + i];
        }
        self.last = Some(from);
        self.windows += 1;
        // Drop input no later window can reach.
        let next = (self.windows as f64 * HOP as f64 * self.speed).round() as u64;
        let keep_from = next.saturating_sub(TOLERANCE as u64).min(from + HOP as u64);
        if keep_from > self.base {
            let drop = (keep_from - self.base) as usize;
            self.input.drain(..drop.min(self.input.len()));
            self.base = keep_from;
        }
        true
    }

    /// The start within `ideal` ± TOLERANCE whose first half-window is
    /// most like the natural continuation at `continuation`.
    fn best_match(&self, ideal: u64, continuation: u64) -> u64 {
        let low = ideal.saturating_sub(TOLERANCE as u64).max(self.base);
        let high = ideal + TOLERANCE as u64;
        let target = (continuation - self.base) as usize;
        let target = &self.input[target..target + HOP];
        let mut best = (f32::MIN, ideal);
        for start in low..=high {
            let at = (start - self.base) as usize;
            let candidate = &self.input[at..at + HOP];
            let score: f32 = candidate
                .iter()
                .zip(target)
                .step_by(STRIDE)
                .map(|(a, b)| a * b)
                .sum();
            if score > best.0 {
                best = (score, start);
            }
        }
        best.1
    }
}
