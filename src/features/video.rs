//! Video preprocessing: a window's F RGB frames to one `[F, 3, H, W]` slot of the model's
//! `video` tensor, `(x / 255 - mean[c]) / std[c]` per channel (models/METADATA.md, "Pixels").
//!
//! Frames arrive already scaled to the model's size by GStreamer, so this is a pure
//! interleaved-to-planar transpose through a 256-entry table per channel: one table load per
//! value, written straight into the caller's batch buffer. It must not resize, crop or
//! allocate per pixel, and it never panics on a frame of the wrong size.

use std::sync::Arc;

use crate::media::VideoFrame;
use crate::model::VideoRecipe;

/// Writes the `video` tensor of one window into `out`, laid out `[F, 3, H, W]`: frame-major,
/// then channel planes R, G, B, each `H` rows of `W` values.
///
/// `out` must hold `recipe.frames * 3 * recipe.height * recipe.width` values (one window's
/// slot of the `[N, F, 3, H, W]` batch buffer); a shorter buffer gets the frames that fit.
///
/// A frame that is not `recipe.width x recipe.height` with `3 * width * height` bytes (the
/// window builder's gap fill may hand over an empty 0x0 frame), and a frame missing because
/// `frames` holds fewer than F, is written as a black frame: every value of channel c is
/// `(0 - mean[c]) / std[c]`, what a real all-black frame would give. Frames beyond F are
/// ignored.
pub fn video_tensor(frames: &[Arc<VideoFrame>], recipe: &VideoRecipe, out: &mut [f32]) {
    let table = PixelTable::new(recipe);
    let width = recipe.width as usize;
    let height = recipe.height as usize;
    let plane_len = width * height;
    let frame_len = 3 * plane_len;
    debug_assert_eq!(out.len(), recipe.frames * frame_len, "video tensor slot of the wrong size");
    if frame_len == 0 {
        return;
    }
    for (frame_idx, frame_out) in out.chunks_exact_mut(frame_len).take(recipe.frames).enumerate() {
        match frames.get(frame_idx) {
            Some(frame)
                if frame.width as usize == width && frame.height as usize == height && frame.rgb.len() == frame_len =>
            {
                table.write_planar(&frame.rgb, frame_out, plane_len)
            }
            _ => table.write_black(frame_out, plane_len),
        }
    }
}

/// Normalised value of every 8-bit level, per channel.
struct PixelTable {
    channels: [[f32; 256]; 3],
}

impl PixelTable {
    fn new(recipe: &VideoRecipe) -> Self {
        let mut channels = [[0.0f32; 256]; 3];
        for (channel, table) in channels.iter_mut().enumerate() {
            let mean = recipe.mean[channel];
            let std = recipe.std[channel];
            for (level, value) in table.iter_mut().enumerate() {
                *value = (level as f32 / 255.0 - mean) / std;
            }
        }
        PixelTable { channels }
    }

    /// `rgb` is `plane_len` packed RGB pixels; `out` is three planes of `plane_len`.
    fn write_planar(&self, rgb: &[u8], out: &mut [f32], plane_len: usize) {
        let (red, rest) = out.split_at_mut(plane_len);
        let (green, blue) = rest.split_at_mut(plane_len);
        let [red_table, green_table, blue_table] = &self.channels;
        for (((pixel, red), green), blue) in rgb.chunks_exact(3).zip(red).zip(green).zip(blue) {
            *red = red_table[pixel[0] as usize];
            *green = green_table[pixel[1] as usize];
            *blue = blue_table[pixel[2] as usize];
        }
    }

    fn write_black(&self, out: &mut [f32], plane_len: usize) {
        for (channel, plane) in out.chunks_exact_mut(plane_len).enumerate() {
            plane.fill(self.channels[channel][0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::RunningTime;

    fn recipe(frames: usize, width: u32, height: u32) -> VideoRecipe {
        VideoRecipe {
            frames,
            height,
            width,
            mean: [0.5, 0.5, 0.5],
            std: [0.5, 0.5, 0.5],
            span_seconds: None,
            span_position: None,
        }
    }

    fn frame(width: u32, height: u32, rgb: Vec<u8>) -> Arc<VideoFrame> {
        Arc::new(VideoFrame { pts: RunningTime::ZERO, duration: None, width, height, rgb })
    }

    fn check(frames: &[Arc<VideoFrame>], recipe: &VideoRecipe, expected: &[f32]) {
        let len = recipe.frames * 3 * (recipe.width * recipe.height) as usize;
        assert_eq!(expected.len(), len, "the test's expected tensor has the wrong size");
        let mut out = vec![f32::NAN; len];
        video_tensor(frames, recipe, &mut out);
        assert_eq!(out, expected);
    }

    /// scenic's `x * 2 / 255 - 1` for mean = std = 0.5, within rounding of the two formulas.
    fn scenic(level: u8) -> f32 {
        (level as f32 / 255.0 - 0.5) / 0.5
    }

    #[test]
    fn planar_layout_per_frame() {
        // 2 frames of 2x1 pixels: [R G B R G B] -> [R R G G B B] per frame.
        let frames = [frame(2, 1, vec![0, 1, 2, 3, 4, 5]), frame(2, 1, vec![10, 11, 12, 13, 14, 15])];
        let expected: Vec<f32> = [0u8, 3, 1, 4, 2, 5, 10, 13, 11, 14, 12, 15].into_iter().map(scenic).collect();
        check(&frames, &recipe(2, 2, 1), &expected);
    }

    #[test]
    fn rows_stay_rows() {
        // 1x2 (one column, two rows): plane order is row-major, row 0 first.
        let frames = [frame(1, 2, vec![255, 0, 0, 0, 255, 0])];
        let expected: Vec<f32> = [255u8, 0, 0, 255, 0, 0].into_iter().map(scenic).collect();
        check(&frames, &recipe(1, 1, 2), &expected);
    }

    #[test]
    fn normalisation_per_channel() {
        let recipe = VideoRecipe { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], ..recipe(1, 1, 1) };
        let frames = [frame(1, 1, vec![0, 128, 255])];
        let expected = [(0.0 - 0.485) / 0.229, (128.0 / 255.0 - 0.456) / 0.224, (1.0 - 0.406) / 0.225];
        check(&frames, &recipe, &expected);
        // The scenic convention maps 0 -> -1 and 255 -> 1.
        check(&[frame(1, 1, vec![0, 255, 0])], &self::recipe(1, 1, 1), &[-1.0, 1.0, -1.0]);
    }

    #[test]
    fn wrong_sized_and_missing_frames_are_black() {
        let recipe = VideoRecipe { mean: [0.5, 0.25, 0.0], std: [0.5, 0.5, 1.0], ..recipe(3, 2, 1) };
        let black = [-1.0, -1.0, -0.5, -0.5, 0.0, 0.0];
        let white = [1.0, 1.0, 1.5, 1.5, 1.0, 1.0];
        // A 0x0 gap-fill frame, a real white frame, then nothing.
        let frames = [frame(0, 0, Vec::new()), frame(2, 1, vec![255; 6])];
        check(&frames, &recipe, &[black, white, black].concat());
        // Right size but a truncated buffer; wrong width with the right byte count.
        let frames =
            [frame(2, 1, vec![255; 5]), frame(1, 2, vec![255; 6]), frame(2, 1, vec![255; 6]), frame(2, 1, vec![0; 6])];
        check(&frames, &recipe, &[black, black, white].concat());
    }

    #[test]
    fn short_buffer_gets_what_fits() {
        // Not how the daemon calls it (debug builds assert the size); must not panic in release.
        if cfg!(debug_assertions) {
            return;
        }
        let mut out = vec![7.0f32; 4];
        video_tensor(&[frame(1, 1, vec![0, 0, 0])], &recipe(2, 1, 1), &mut out);
        assert_eq!(out, [-1.0, -1.0, -1.0, 7.0]);
    }
}
