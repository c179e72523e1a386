//! Log-mel spectrogram of one window's audio: the model's `audio` tensor `[T, M]`, row =
//! frame, by the recipe in models/METADATA.md ("Log-mel recipe"), bit for bit the same
//! whether a window is computed alone (`LogMel::compute`) or streamed (`LogMelStream`).
//!
//! Everything the recipe fixes (periodic Hann window, sparse HTK filterbank, FFT plan,
//! scratch) is built once in `LogMel::new`; computing allocates nothing. The arithmetic runs
//! in f64 like the NumPy reference (models/mbt/logmel.py) and rounds to f32 once, at the end:
//! bins far below a sine's peak sit near `log_offset`, where f32 FFT round-off would show in
//! the log domain. Consecutive windows of a source overlap (`hop < window_seconds`), so
//! `LogMelStream` keeps the rows of the previous window and computes only frames it has not
//! seen, which makes a hop cost its new frames instead of the whole window.

use std::ops::Range;
use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

use super::FeatureError;
use crate::model::AudioRecipe;

/// The recipe of one model, ready to run: one per inference worker or per source.
pub struct LogMel {
    n_frames: usize,
    n_mels: usize,
    win_length: usize,
    hop_length: usize,
    power: Power,
    log_offset: f64,
    mean: f64,
    std: f64,
    /// Periodic Hann window, `win_length` values.
    window: Vec<f64>,
    /// Mel filter m: FFT bins `bins` weighted by `weights[weight_range]`; bins outside its
    /// triangle have weight zero and are skipped.
    filters: Vec<MelFilter>,
    weights: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
    /// `n_fft` samples in; the FFT uses it as scratch, so it is refilled for every frame.
    fft_input: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    fft_scratch: Vec<Complex<f64>>,
    /// `|X[k]|^power`, `n_fft / 2 + 1` bins.
    power_spectrum: Vec<f64>,
}

impl LogMel {
    /// Checks the recipe and precomputes everything a frame needs. Errors name the field.
    pub fn new(recipe: &AudioRecipe) -> Result<LogMel, FeatureError> {
        check_recipe(recipe)?;
        let n_bins = recipe.n_fft / 2 + 1;
        let (filters, weights) = mel_filterbank(recipe);
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(recipe.n_fft);
        let fft_scratch = fft.make_scratch_vec();
        let power = if recipe.power == 2.0 {
            Power::Squared
        } else if recipe.power == 1.0 {
            Power::Magnitude
        } else {
            Power::Other(recipe.power)
        };
        Ok(LogMel {
            n_frames: recipe.n_frames,
            n_mels: recipe.n_mels,
            win_length: recipe.win_length,
            hop_length: recipe.hop_length,
            power,
            log_offset: recipe.log_offset,
            mean: recipe.mean,
            std: recipe.std,
            window: hann_periodic(recipe.win_length),
            filters,
            weights,
            fft_input: fft.make_input_vec(),
            spectrum: fft.make_output_vec(),
            fft,
            fft_scratch,
            power_spectrum: vec![0.0; n_bins],
        })
    }

    /// T: frames (rows) per window.
    pub fn n_frames(&self) -> usize {
        self.n_frames
    }

    /// M: mel bins (columns) per frame.
    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// S = T * hop_length: audio samples per window.
    pub fn n_samples(&self) -> usize {
        self.n_frames * self.hop_length
    }

    /// T * M: values `compute` and `LogMelStream::window` write.
    pub fn output_len(&self) -> usize {
        self.n_frames * self.n_mels
    }

    /// Computes a whole window: `out` is `[T, M]`, row = frame.
    ///
    /// `audio` should hold exactly S samples: shorter is zero-padded (as the Python reference
    /// does), samples past S are ignored, and frames reaching past S see zeros (the recipe's
    /// step 1). `out` must hold `output_len()` values; a shorter buffer gets the rows that fit.
    pub fn compute(&mut self, audio: &[f32], out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.output_len(), "log-mel output of the wrong size");
        let audio = &audio[..audio.len().min(self.n_samples())];
        let hop_length = self.hop_length;
        for (frame_idx, row) in out.chunks_exact_mut(self.n_mels).take(self.n_frames).enumerate() {
            self.frame(audio, frame_idx * hop_length, row);
        }
    }

    /// Rows whose frame lies inside the window's S samples, i.e. does not touch the zero
    /// padding: rows `0..n_final_rows()`. The next window sees real data where the others saw
    /// zeros, so only these can be reused.
    fn n_final_rows(&self) -> usize {
        match self.n_samples().checked_sub(self.win_length) {
            Some(room) => (room / self.hop_length + 1).min(self.n_frames),
            None => 0,
        }
    }

    /// One frame, the recipe's steps 1 to 5, from `audio[start..start + win_length]` (zeros
    /// past the end of `audio`) into `row` (`n_mels` values).
    fn frame(&mut self, audio: &[f32], start: usize, row: &mut [f32]) {
        let samples = audio.get(start..).unwrap_or(&[]);
        let available = samples.len().min(self.win_length);
        let (windowed, padding) = self.fft_input.split_at_mut(available);
        for ((value, sample), weight) in windowed.iter_mut().zip(samples).zip(&self.window) {
            *value = *sample as f64 * weight;
        }
        padding.fill(0.0);
        // Lengths are fixed by the plan in `new`, so this cannot fail; NaNs rather than a panic.
        if self.fft.process_with_scratch(&mut self.fft_input, &mut self.spectrum, &mut self.fft_scratch).is_err() {
            row.fill(f32::NAN);
            return;
        }
        for (power, bin) in self.power_spectrum.iter_mut().zip(&self.spectrum) {
            *power = self.power.of(*bin);
        }
        for (value, filter) in row.iter_mut().zip(&self.filters) {
            let weights = &self.weights[filter.weights.clone()];
            let powers = &self.power_spectrum[filter.bins.clone()];
            let mel: f64 = weights.iter().zip(powers).map(|(weight, power)| weight * power).sum();
            *value = (((mel + self.log_offset).ln() - self.mean) / self.std) as f32;
        }
    }
}

/// Log-mel of consecutive windows of one source, reusing the rows of the previous window.
///
/// Window k + 1's frame i is window k's frame `i + d` when the windows start `d * hop_length`
/// samples apart; such a row is copied instead of computed when that frame lay wholly inside
/// window k's samples and those samples are bit for bit the same now (a gap filled with
/// zeros in one window and with late data in the next is recomputed). The output is always
/// exactly what `LogMel::compute` gives for the same `audio`. Windows that do not start a
/// whole number of hops after the previous one, that start before it, or share no complete
/// frame with it are computed in full.
///
/// With 8 s windows and a 1 s hop (800 frames of 10 ms) a window computes 102 rows: the 100
/// new frames and the 2 that reached past the last window's end. It holds the last window's
/// rows and two windows of samples (about 1.4 MB at 16 kHz, 8 s, 128 mels); one per source.
pub struct LogMelStream {
    log_mel: LogMel,
    /// `[T, M]` rows of the last window.
    rows: Vec<f32>,
    /// The last window's samples, zero-padded to S, and the incoming window's.
    last_samples: Vec<f32>,
    samples: Vec<f32>,
    /// `first_sample` of the last window; `None` before the first and after `reset`.
    last_first_sample: Option<i64>,
    rows_computed: usize,
    /// Per block of `hop_length` samples of the incoming window: equal to the last window's.
    block_unchanged: Vec<bool>,
}

impl LogMelStream {
    pub fn new(recipe: &AudioRecipe) -> Result<LogMelStream, FeatureError> {
        LogMel::new(recipe).map(LogMelStream::from)
    }

    /// The log-mel of the window whose `audio[0]` is sample `first_sample` of the source's
    /// sample clock, into `out` (`[T, M]`): the same values as `LogMel::compute(audio, out)`.
    pub fn window(&mut self, first_sample: i64, audio: &[f32], out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.log_mel.output_len(), "log-mel output of the wrong size");
        let n_mels = self.log_mel.n_mels;
        let n_frames = self.log_mel.n_frames;
        let hop_length = self.log_mel.hop_length;
        let blocks_per_frame = self.log_mel.win_length.div_ceil(hop_length);

        std::mem::swap(&mut self.samples, &mut self.last_samples);
        let valid = audio.len().min(self.samples.len());
        self.samples[..valid].copy_from_slice(&audio[..valid]);
        self.samples[valid..].fill(0.0);

        // Row i may be copied from the last window's row i + shift, which must be final.
        let reusable_rows = match self.shift_from_last(first_sample) {
            Some(shift) if shift < self.log_mel.n_final_rows() => {
                let reusable_rows = self.log_mel.n_final_rows() - shift;
                self.rows.copy_within(shift * n_mels.., 0);
                self.compare_blocks(shift, reusable_rows + blocks_per_frame);
                reusable_rows
            }
            _ => 0,
        };
        self.rows_computed = 0;
        for (frame_idx, row) in self.rows.chunks_exact_mut(n_mels).enumerate() {
            let start = frame_idx * hop_length;
            let blocks = frame_idx..(start + self.log_mel.win_length).div_ceil(hop_length);
            let unchanged = frame_idx < reusable_rows && self.block_unchanged[blocks].iter().all(|same| *same);
            if !unchanged {
                self.log_mel.frame(&self.samples, start, row);
                self.rows_computed += 1;
            }
        }
        debug_assert_eq!(self.rows.len(), n_frames * n_mels);
        let len = out.len().min(self.rows.len());
        out[..len].copy_from_slice(&self.rows[..len]);
        self.last_first_sample = Some(first_sample);
    }

    /// Rows the last `window` call computed; the rest were reused.
    pub fn rows_computed(&self) -> usize {
        self.rows_computed
    }

    /// Forgets the previous window, e.g. when a source restarts and its sample clock with it.
    pub fn reset(&mut self) {
        self.last_first_sample = None;
    }

    pub fn log_mel(&self) -> &LogMel {
        &self.log_mel
    }

    /// How many whole frames the incoming window starts after the last one.
    fn shift_from_last(&self, first_sample: i64) -> Option<usize> {
        let distance = first_sample.checked_sub(self.last_first_sample?)?;
        let hop_length = i64::try_from(self.log_mel.hop_length).ok()?;
        if distance < 0 || distance % hop_length != 0 {
            return None;
        }
        usize::try_from(distance / hop_length).ok()
    }

    /// Marks which of the first `n_blocks` hop-sized blocks of the incoming samples equal the
    /// last window's samples `shift` blocks further on (bit patterns, so -0.0 != 0.0).
    fn compare_blocks(&mut self, shift: usize, n_blocks: usize) {
        let hop_length = self.log_mel.hop_length;
        let incoming = self.samples.chunks_exact(hop_length);
        let last = self.last_samples.chunks_exact(hop_length).skip(shift);
        self.block_unchanged.clear();
        self.block_unchanged.extend(incoming.zip(last).take(n_blocks).map(|(incoming, last)| {
            incoming.iter().zip(last).fold(true, |same, (a, b)| same & (a.to_bits() == b.to_bits()))
        }));
        // Blocks past the last window's end are not comparable.
        self.block_unchanged.resize(n_blocks, false);
    }
}

impl From<LogMel> for LogMelStream {
    fn from(log_mel: LogMel) -> Self {
        let n_samples = log_mel.n_samples();
        LogMelStream {
            rows: vec![0.0; log_mel.output_len()],
            last_samples: vec![0.0; n_samples],
            samples: vec![0.0; n_samples],
            last_first_sample: None,
            rows_computed: 0,
            block_unchanged: Vec::with_capacity(log_mel.n_frames + log_mel.win_length.div_ceil(log_mel.hop_length)),
            log_mel,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Power {
    Magnitude,
    Squared,
    Other(f64),
}

impl Power {
    fn of(self, bin: Complex<f64>) -> f64 {
        let squared = bin.re * bin.re + bin.im * bin.im;
        match self {
            Power::Squared => squared,
            Power::Magnitude => squared.sqrt(),
            Power::Other(power) => squared.sqrt().powf(power),
        }
    }
}

struct MelFilter {
    bins: Range<usize>,
    weights: Range<usize>,
}

/// Largest FFT accepted; far above any audio model's, low enough that a corrupt recipe
/// cannot ask for gigabytes.
const MAX_N_FFT: usize = 1 << 16;
const MAX_N_MELS: usize = 4096;
const MAX_SAMPLES: usize = 1 << 26;

fn check_recipe(recipe: &AudioRecipe) -> Result<(), FeatureError> {
    let invalid = |field, value: &dyn std::fmt::Display, allowed| {
        Err(FeatureError::InvalidAudioRecipe { field, value: value.to_string(), allowed })
    };
    if recipe.window != "hann" {
        return Err(FeatureError::UnsupportedWindow(recipe.window.clone()));
    }
    if recipe.mel_scale != "htk" {
        return Err(FeatureError::UnsupportedMelScale(recipe.mel_scale.clone()));
    }
    if recipe.sample_rate == 0 {
        return invalid("sample_rate", &recipe.sample_rate, "must be positive");
    }
    if recipe.n_fft == 0 || recipe.n_fft > MAX_N_FFT {
        return invalid("n_fft", &recipe.n_fft, "must be in 1..=65536");
    }
    if recipe.win_length == 0 || recipe.win_length > recipe.n_fft {
        return invalid("win_length", &recipe.win_length, "must be in 1..=n_fft");
    }
    if recipe.hop_length == 0 {
        return invalid("hop_length", &recipe.hop_length, "must be positive");
    }
    if recipe.n_frames == 0 || recipe.n_frames.checked_mul(recipe.hop_length).is_none_or(|n| n > MAX_SAMPLES) {
        return invalid("n_frames", &recipe.n_frames, "must be positive, with n_frames * hop_length <= 2^26 samples");
    }
    if recipe.n_mels == 0 || recipe.n_mels > MAX_N_MELS {
        return invalid("n_mels", &recipe.n_mels, "must be in 1..=4096");
    }
    let nyquist = recipe.sample_rate as f64 / 2.0;
    if !(recipe.fmax > 0.0 && recipe.fmax <= nyquist) {
        return invalid("fmax", &recipe.fmax, "must be in (0, sample_rate / 2]");
    }
    if !(recipe.fmin >= 0.0 && recipe.fmin < recipe.fmax) {
        return invalid("fmin", &recipe.fmin, "must be in [0, fmax)");
    }
    if !(recipe.power > 0.0 && recipe.power.is_finite()) {
        return invalid("power", &recipe.power, "must be positive (2 for power, 1 for magnitude)");
    }
    if !(recipe.log_offset > 0.0 && recipe.log_offset.is_finite()) {
        return invalid("log_offset", &recipe.log_offset, "must be positive");
    }
    if !recipe.mean.is_finite() {
        return invalid("mean", &recipe.mean, "must be a finite number");
    }
    if !(recipe.std > 0.0 && recipe.std.is_finite()) {
        return invalid("std", &recipe.std, "must be positive");
    }
    Ok(())
}

/// `w[n] = 0.5 - 0.5 cos(2 pi n / N)`: periodic, so w[0] = 0 and w[N/2] = 1.
fn hann_periodic(len: usize) -> Vec<f64> {
    (0..len).map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / len as f64).cos()).collect()
}

fn hz_to_mel(hz: f64) -> f64 {
    2595.0 * (1.0 + hz / 700.0).log10()
}

fn mel_to_hz(mel: f64) -> f64 {
    700.0 * (10f64.powf(mel / 2595.0) - 1.0)
}

/// The `n_mels + 2` triangle corners in Hz: evenly spaced in mel from fmin to fmax
/// (`numpy.linspace`, whose last point is exactly the end). Filter m peaks at corner m + 1.
fn mel_corners(recipe: &AudioRecipe) -> Vec<f64> {
    let (first, last) = (hz_to_mel(recipe.fmin), hz_to_mel(recipe.fmax));
    let n_points = recipe.n_mels + 2;
    let step = (last - first) / (n_points - 1) as f64;
    (0..n_points)
        .map(|point| if point == n_points - 1 { last } else { point as f64 * step + first })
        .map(mel_to_hz)
        .collect()
}

/// HTK triangles without area normalisation (torchaudio `melscale_fbanks(norm=None,
/// mel_scale="htk")`), the same arithmetic as the reference, stored sparsely.
fn mel_filterbank(recipe: &AudioRecipe) -> (Vec<MelFilter>, Vec<f64>) {
    let corners = mel_corners(recipe);
    let n_bins = recipe.n_fft / 2 + 1;
    let bin_hz = |bin: usize| bin as f64 * recipe.sample_rate as f64 / recipe.n_fft as f64;
    let mut filters = Vec::with_capacity(recipe.n_mels);
    let mut weights = Vec::new();
    for corner in corners.windows(3) {
        let (low, centre, high) = (corner[0], corner[1], corner[2]);
        let weight = |bin: usize| {
            let hz = bin_hz(bin);
            let rising = (hz - low) / (centre - low);
            let falling = (high - hz) / (high - centre);
            rising.min(falling).max(0.0)
        };
        let first_bin = (0..n_bins).find(|bin| weight(*bin) > 0.0).unwrap_or(0);
        let end_bin = (first_bin..n_bins).find(|bin| weight(*bin) <= 0.0).unwrap_or(n_bins).max(first_bin);
        let start = weights.len();
        weights.extend((first_bin..end_bin).map(weight));
        filters.push(MelFilter { bins: first_bin..end_bin, weights: start..weights.len() });
    }
    (filters, weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The daemon's default: 16 kHz, 25 ms / 10 ms frames, 512-point FFT, 128 HTK mels.
    fn recipe(n_frames: usize) -> AudioRecipe {
        AudioRecipe {
            sample_rate: 16000,
            n_frames,
            n_mels: 128,
            win_length: 400,
            hop_length: 160,
            n_fft: 512,
            window: "hann".into(),
            mel_scale: "htk".into(),
            fmin: 0.0,
            fmax: 8000.0,
            power: 2.0,
            log_offset: 1e-6,
            mean: 0.0,
            std: 1.0,
        }
    }

    fn sine(hz: f64, amplitude: f64, sample_rate: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|n| (amplitude * (2.0 * std::f64::consts::PI * hz * n as f64 / sample_rate as f64).sin()) as f32)
            .collect()
    }

    /// `compute` on `audio` is within `tolerance` of `expected` everywhere, and streaming it
    /// as the first window of a source gives the same bits.
    fn check(recipe: &AudioRecipe, audio: &[f32], expected: &[f32], tolerance: f32) -> f32 {
        let mut log_mel = LogMel::new(recipe).expect("test recipe");
        let mut out = vec![f32::NAN; log_mel.output_len()];
        log_mel.compute(audio, &mut out);
        assert_eq!(out.len(), expected.len(), "the test's expected output has the wrong size");
        let mut worst = 0.0f32;
        for (idx, (got, want)) in out.iter().zip(expected).enumerate() {
            let difference = (got - want).abs();
            assert!(
                difference <= tolerance,
                "frame {} mel {}: got {got}, expected {want} (tolerance {tolerance})",
                idx / recipe.n_mels,
                idx % recipe.n_mels
            );
            worst = worst.max(difference);
        }
        let mut stream = LogMelStream::new(recipe).expect("test recipe");
        let mut streamed = vec![f32::NAN; out.len()];
        stream.window(0, audio, &mut streamed);
        assert_eq!(bits(&streamed), bits(&out));
        worst
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|value| value.to_bits()).collect()
    }

    #[test]
    fn silence_is_the_standardised_log_offset() {
        let mut recipe = recipe(200);
        check(&recipe, &vec![0.0; 32000], &vec![(1e-6f64).ln() as f32; 200 * 128], 0.0);
        recipe.mean = -5.0;
        recipe.std = 2.0;
        recipe.log_offset = 1e-3;
        check(&recipe, &vec![0.0; 32000], &vec![(((1e-3f64).ln() + 5.0) / 2.0) as f32; 200 * 128], 0.0);
        // Shorter audio is zero-padded, as in the reference.
        check(&recipe, &[], &vec![(((1e-3f64).ln() + 5.0) / 2.0) as f32; 200 * 128], 0.0);
    }

    #[test]
    fn a_sine_peaks_in_the_mel_bin_centred_nearest_its_frequency() {
        let recipe = recipe(200);
        let centres = &mel_corners(&recipe)[1..=recipe.n_mels];
        let mut log_mel = LogMel::new(&recipe).unwrap();
        let mut out = vec![0.0; log_mel.output_len()];
        for hz in [250.0, 1000.0, 3000.0, 6000.0] {
            log_mel.compute(&sine(hz, 0.5, 16000, 32000), &mut out);
            // Frames fully inside the signal.
            let mut mean_row = vec![0.0f64; recipe.n_mels];
            for row in out.chunks_exact(recipe.n_mels).skip(5).take(190) {
                mean_row.iter_mut().zip(row).for_each(|(sum, value)| *sum += *value as f64);
            }
            let peak = argmax(&mean_row);
            let nearest = argmax(&centres.iter().map(|centre| -(centre - hz).abs()).collect::<Vec<_>>());
            assert_eq!(peak, nearest, "{hz} Hz peaks in mel {peak} centred at {} Hz", centres[peak]);
        }
    }

    fn argmax(values: &[f64]) -> usize {
        (0..values.len()).fold(0, |best, idx| if values[idx] > values[best] { idx } else { best })
    }

    #[test]
    fn filterbank_triangles() {
        let recipe = recipe(200);
        let (filters, weights) = mel_filterbank(&recipe);
        assert_eq!(filters.len(), 128);
        assert!(weights.iter().all(|weight| *weight > 0.0 && *weight <= 1.0));
        // Filter 0 (0 to 28 Hz) falls between bins 0 and 1: always ln(log_offset), as in the
        // reference and torchaudio. Every other filter covers at least one bin.
        assert!(filters[0].bins.is_empty());
        assert!(filters[1..].iter().all(|filter| !filter.bins.is_empty()));
        // Rising edge of m meets the falling edge of m - 1: inner filters sum to 1 per bin.
        let mut per_bin = vec![0.0f64; 257];
        for filter in &filters[1..127] {
            for (bin, weight) in filter.bins.clone().zip(&weights[filter.weights.clone()]) {
                per_bin[bin] += weight;
            }
        }
        assert!(per_bin[20..200].iter().all(|sum| (sum - 1.0).abs() < 1e-9), "{per_bin:?}");
        // The corners run from fmin to fmax.
        let corners = mel_corners(&recipe);
        assert_eq!(corners[0], 0.0);
        assert!((corners[129] - 8000.0).abs() < 1e-9, "{}", corners[129]);
    }

    #[test]
    fn framing_is_not_centred() {
        // An impulse at sample p reaches the frames with i * hop < p < i * hop + win (the
        // periodic Hann window is 0 at n = 0) and no other.
        let recipe = recipe(100);
        let mut audio = vec![0.0f32; 16000];
        audio[1000] = 1.0;
        let mut log_mel = LogMel::new(&recipe).unwrap();
        let mut out = vec![0.0; log_mel.output_len()];
        log_mel.compute(&audio, &mut out);
        let floor = (1e-6f64).ln() as f32;
        let hit: Vec<usize> =
            (0..100).filter(|i| out[i * 128..(i + 1) * 128].iter().any(|v| *v > floor + 1e-3)).collect();
        assert_eq!(hit, [4, 5, 6]);
    }

    #[test]
    fn frames_past_the_end_see_zeros() {
        let recipe = recipe(100);
        let noise: Vec<f32> = Noise(7).take(16000).collect();
        let mut log_mel = LogMel::new(&recipe).unwrap();
        let mut alone = vec![0.0; log_mel.output_len()];
        log_mel.compute(&noise, &mut alone);
        // The same 100 frames from a longer signal whose tail is zeros, and then real data.
        let mut longer = noise.clone();
        longer.extend(std::iter::repeat_n(0.0, 1000));
        let mut out = vec![0.0; log_mel.output_len()];
        log_mel.compute(&longer, &mut out);
        assert_eq!(bits(&out), bits(&alone));
        longer.truncate(16000);
        longer.extend(Noise(8).take(1000));
        let mut longer_recipe = recipe.clone();
        longer_recipe.n_frames = 106;
        let mut longer_log_mel = LogMel::new(&longer_recipe).unwrap();
        let mut out = vec![0.0; longer_log_mel.output_len()];
        longer_log_mel.compute(&longer, &mut out);
        assert_eq!(bits(&out[..98 * 128]), bits(&alone[..98 * 128]));
        assert_ne!(bits(&out[98 * 128..100 * 128]), bits(&alone[98 * 128..]));
        assert_eq!(log_mel.n_final_rows(), 98);
    }

    /// `LogMel::new` refuses the default recipe after `change`, with `expected`.
    fn check_refused(change: impl FnOnce(&mut AudioRecipe), expected: FeatureError) {
        let mut bad = recipe(200);
        change(&mut bad);
        assert_eq!(LogMel::new(&bad).err(), Some(expected));
    }

    fn invalid(field: &'static str, value: &str, allowed: &'static str) -> FeatureError {
        FeatureError::InvalidAudioRecipe { field, value: value.into(), allowed }
    }

    #[test]
    fn recipes_the_code_cannot_compute_are_refused() {
        check_refused(|r| r.window = "hamming".into(), FeatureError::UnsupportedWindow("hamming".into()));
        check_refused(|r| r.mel_scale = "slaney".into(), FeatureError::UnsupportedMelScale("slaney".into()));
        check_refused(|r| r.win_length = 1024, invalid("win_length", "1024", "must be in 1..=n_fft"));
        check_refused(|r| r.win_length = 0, invalid("win_length", "0", "must be in 1..=n_fft"));
        check_refused(|r| r.hop_length = 0, invalid("hop_length", "0", "must be positive"));
        check_refused(|r| r.n_fft = 0, invalid("n_fft", "0", "must be in 1..=65536"));
        check_refused(|r| r.n_fft = 1 << 20, invalid("n_fft", "1048576", "must be in 1..=65536"));
        check_refused(
            |r| r.n_frames = 0,
            invalid("n_frames", "0", "must be positive, with n_frames * hop_length <= 2^26 samples"),
        );
        check_refused(|r| r.n_mels = 0, invalid("n_mels", "0", "must be in 1..=4096"));
        check_refused(|r| r.fmax = 9000.0, invalid("fmax", "9000", "must be in (0, sample_rate / 2]"));
        check_refused(|r| r.fmax = f64::NAN, invalid("fmax", "NaN", "must be in (0, sample_rate / 2]"));
        check_refused(|r| r.fmin = 8000.0, invalid("fmin", "8000", "must be in [0, fmax)"));
        check_refused(|r| r.log_offset = 0.0, invalid("log_offset", "0", "must be positive"));
        check_refused(|r| r.std = 0.0, invalid("std", "0", "must be positive"));
        let message = LogMel::new(&AudioRecipe { std: -1.0, ..recipe(200) }).err().unwrap().to_string();
        assert_eq!(message, "audio.std = -1 is not usable: must be positive");
    }

    #[test]
    fn each_hop_computes_only_its_new_frames() {
        // 8 s windows, 1 s hop: 100 new frames plus the 2 that touched the last window's end.
        let recipe = recipe(800);
        let signal: Vec<f32> = Noise(3).take(16000 * 12).collect();
        let mut stream = LogMelStream::new(&recipe).unwrap();
        let mut log_mel = LogMel::new(&recipe).unwrap();
        let mut streamed = vec![0.0; 800 * 128];
        let mut alone = vec![0.0; 800 * 128];
        let mut computed = Vec::new();
        for window_idx in 0..5 {
            let first_sample = window_idx * 16000;
            let audio = &signal[first_sample..first_sample + 128000];
            stream.window(first_sample as i64, audio, &mut streamed);
            computed.push(stream.rows_computed());
            log_mel.compute(audio, &mut alone);
            assert_eq!(bits(&streamed), bits(&alone), "window {window_idx}");
        }
        assert_eq!(computed, [800, 102, 102, 102, 102]);
        // A source restart starts over; the same window twice reuses all final rows.
        stream.reset();
        stream.window(0, &signal[..128000], &mut streamed);
        assert_eq!(stream.rows_computed(), 800);
        stream.window(0, &signal[..128000], &mut streamed);
        assert_eq!(stream.rows_computed(), 2);
    }

    #[test]
    fn a_changed_overlap_is_recomputed() {
        // Regression guard: window k zero-filled a gap that window k + 1 holds real data for.
        let recipe = recipe(200);
        let signal: Vec<f32> = Noise(11).take(16000 * 4).collect();
        let mut gapped = signal[..32000].to_vec();
        gapped[20000..20800].fill(0.0);
        let mut stream = LogMelStream::new(&recipe).unwrap();
        let mut streamed = vec![0.0; 200 * 128];
        stream.window(0, &gapped, &mut streamed);
        let next = &signal[16000..48000];
        stream.window(16000, next, &mut streamed);
        let mut alone = vec![0.0; 200 * 128];
        LogMel::new(&recipe).unwrap().compute(next, &mut alone);
        assert_eq!(bits(&streamed), bits(&alone));
        // Frames touching samples 4000..4800 of the new window: 23..=29, plus the 100 new + 2.
        assert_eq!(stream.rows_computed(), 102 + 7);
    }

    /// The fixed signals of the parity test: `len` samples at `sample_rate`.
    fn parity_signals(sample_rate: u32, len: usize) -> Vec<(String, Vec<f32>)> {
        let mut signals = vec![("silence".to_string(), vec![0.0; len])];
        for hz in [50.0, 440.0, 1000.0, 3000.0, 0.49 * sample_rate as f64] {
            signals.push((format!("sine {hz} Hz at 0.5"), sine(hz, 0.5, sample_rate, len)));
        }
        signals.push(("full-scale sine 1000 Hz".into(), sine(1000.0, 1.0, sample_rate, len)));
        signals.push(("white noise".into(), Noise(42).take(len).collect()));
        signals.push(("quiet noise 1e-4".into(), Noise(43).take(len).map(|x| x * 1e-4).collect()));
        let clicks = (0..len).map(|n| match n % 1601 {
            0 => 1.0,
            800 => -1.0,
            _ => 0.0,
        });
        signals.push(("clicks".into(), clicks.collect()));
        for hz in [1000.0, 440.0] {
            let square = (0..len).map(|n| if (n as f64 * hz / sample_rate as f64).fract() < 0.5 { 1.0 } else { -1.0 });
            signals.push((format!("full-scale square {hz} Hz"), square.collect()));
        }
        signals
    }

    #[test]
    fn parity_with_the_committed_numpy_fixture() {
        // No Python needed: models/testdata/logmel.expected.npy is the reference's output
        // (raw log domain, mean 0 / std 1) for a chirp + tone + noise + silence.
        let (recipe, samples, expected) = crate::features::parity::committed_fixture();
        assert_eq!(samples.len(), recipe.n_frames * recipe.hop_length);
        let tolerance = (1e-4 / recipe.std) as f32;
        let difference = check(&recipe, &samples, &expected, tolerance) as f64 * recipe.std;
        println!("log-mel parity, committed fixture: max |rust - numpy| = {difference:.3e} (log domain)");
    }

    #[test]
    fn parity_with_the_numpy_reference() {
        let Some(python) = crate::features::parity::python() else {
            // CI always has the interpreter (scripts/test.sh sets MBT_PYTHON): never skip there.
            assert!(std::env::var_os("CI").is_none(), "CI must run the log-mel parity test: set MBT_PYTHON");
            println!("log-mel parity SKIPPED: no python with numpy (set MBT_PYTHON, or make models/.venv)");
            return;
        };
        let other = AudioRecipe {
            n_frames: 50,
            n_mels: 64,
            win_length: 480,
            hop_length: 320,
            n_fft: 1024,
            fmin: 50.0,
            fmax: 7000.0,
            power: 1.0,
            log_offset: 1e-3,
            mean: -3.0,
            std: 4.0,
            ..recipe(1)
        };
        let narrow = AudioRecipe {
            sample_rate: 8000,
            n_frames: 50,
            n_mels: 40,
            win_length: 200,
            hop_length: 80,
            n_fft: 256,
            fmin: 20.0,
            fmax: 4000.0,
            power: 1.5,
            log_offset: 1e-8,
            ..recipe(1)
        };
        let mut worst = 0.0f64;
        for recipe in [recipe(200), other, narrow] {
            let n_samples = recipe.n_frames * recipe.hop_length;
            for (name, signal) in parity_signals(recipe.sample_rate, n_samples) {
                let expected = crate::features::parity::reference_log_mel(&python, &recipe, &signal);
                // The bound holds in the log domain, before standardisation: (x - mean) / std
                // divides a difference by std.
                let tolerance = (1e-4 / recipe.std) as f32;
                let difference = check(&recipe, &signal, &expected, tolerance) as f64 * recipe.std;
                println!(
                    "log-mel parity {} Hz, n_fft {}, power {}: {name}: max |rust - numpy| = {difference:.3e} (log domain)",
                    recipe.sample_rate, recipe.n_fft, recipe.power
                );
                worst = worst.max(difference);
            }
        }
        println!("log-mel parity: max |rust - numpy| over all signals = {worst:.3e} (log domain, bound 1e-4)");
    }

    /// Uniform noise in [-1, 1) from a fixed seed (xorshift64*), the same on every machine.
    struct Noise(pub u64);

    impl Iterator for Noise {
        type Item = f32;
        fn next(&mut self) -> Option<f32> {
            let mut x = self.0.max(1);
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let bits = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
            Some(bits as f32 / (1u32 << 23) as f32 - 1.0)
        }
    }

    fn small_recipe(hop_length: usize, win_length: usize, n_fft: usize, n_frames: usize) -> AudioRecipe {
        AudioRecipe {
            sample_rate: 8000,
            n_frames,
            n_mels: 12,
            win_length,
            hop_length,
            n_fft,
            fmax: 4000.0,
            ..recipe(1)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn streaming_equals_computing_each_window(
            hop_length in 2usize..24,
            win_factor in 1usize..40,
            n_frames in 1usize..40,
            seed in 1u64..u64::MAX,
            // Steps between windows in hops, with an occasional odd sample offset and change.
            steps in proptest::collection::vec((0usize..12, 0usize..8, proptest::option::weighted(0.15, 0usize..2000)), 1..12),
        ) {
            let win_length = (hop_length * win_factor / 10).max(1);
            let n_fft = win_length.next_power_of_two().max(8);
            let recipe = small_recipe(hop_length, win_length, n_fft, n_frames);
            let n_samples = n_frames * hop_length;
            let signal: Vec<f32> = Noise(seed).take(n_samples + 60 * hop_length * steps.len() + 16).collect();
            let mut stream = LogMelStream::new(&recipe).unwrap();
            let mut log_mel = LogMel::new(&recipe).unwrap();
            let mut streamed = vec![0.0; log_mel.output_len()];
            let mut alone = vec![0.0; log_mel.output_len()];
            let mut first_sample = 0usize;
            for (hops, odd, change) in steps {
                // Mostly small whole-hop steps (overlap), sometimes an unaligned one.
                first_sample += hops * hop_length + if odd == 0 { 1 } else { 0 };
                let mut audio = signal[first_sample..first_sample + n_samples].to_vec();
                if let Some(at) = change {
                    let at = at % n_samples;
                    audio[at] = -audio[at] - 0.25;
                }
                stream.window(first_sample as i64, &audio, &mut streamed);
                log_mel.compute(&audio, &mut alone);
                prop_assert_eq!(bits(&streamed), bits(&alone));
            }
        }
    }
}
