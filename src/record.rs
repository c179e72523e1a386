//! `mbt-edge record`: windows of model inputs, exactly as the daemon computes them, written
//! to a dataset folder for training (format: models/README.md, "Dataset format").
//!
//! `DIR/features.json` holds the recording model's `mbt` metadata; a folder recorded with
//! another recipe is refused. Each window is `<stem>.video.npy` `[F, 3, H, W]` and
//! `<stem>.audio.npy` `[T, M]` (f32), and one line of `DIR/manifest.jsonl`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use crate::model::ModelMetadata;
use crate::npy::write_npy;
use crate::window::Window;

/// Appends windows to a dataset folder.
pub struct DatasetWriter {
    dir: PathBuf,
    manifest: BufWriter<File>,
    video_shape: Option<[usize; 4]>,
    audio_shape: Option<[usize; 2]>,
}

#[derive(Serialize)]
struct ManifestLine<'a> {
    file: &'a str,
    label: &'a str,
    source: &'a str,
    window_start: String,
    window_index: u64,
    degraded: Option<&'a str>,
}

impl DatasetWriter {
    /// Opens (or creates) `dir` for windows computed with `metadata`'s recipe.
    pub fn open(dir: &Path, metadata: &ModelMetadata) -> anyhow::Result<DatasetWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let features_path = dir.join("features.json");
        let recipe = serde_json::to_value(metadata)?;
        if features_path.exists() {
            let text = std::fs::read_to_string(&features_path)
                .with_context(|| format!("reading {}", features_path.display()))?;
            let existing: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", features_path.display()))?;
            if strip_labels(&existing) != strip_labels(&recipe) {
                bail!(
                    "{} was recorded with another preprocessing recipe than model {:?}; record into a new folder",
                    features_path.display(),
                    metadata.name
                );
            }
        } else {
            std::fs::write(&features_path, serde_json::to_string_pretty(&recipe)?)
                .with_context(|| format!("writing {}", features_path.display()))?;
        }
        let manifest_path = dir.join("manifest.jsonl");
        let manifest = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&manifest_path)
            .with_context(|| format!("opening {}", manifest_path.display()))?;
        Ok(DatasetWriter {
            dir: dir.to_path_buf(),
            manifest: BufWriter::new(manifest),
            video_shape: metadata.video.as_ref().map(|v| [v.frames, 3, v.height as usize, v.width as usize]),
            audio_shape: metadata.audio.as_ref().map(|a| [a.n_frames, a.n_mels]),
        })
    }

    /// Writes one window's tensors and its manifest line; returns the stem.
    pub fn write(&mut self, label: &str, window: &Window, video: &[f32], audio: &[f32]) -> anyhow::Result<String> {
        let start = window.start_utc.format(&Rfc3339)?;
        let compact: String = start.chars().filter(|c| c.is_ascii_alphanumeric()).take(18).collect();
        let stem = format!("{}/{}-{}-{:06}", sanitize(label), sanitize(&window.source), compact, window.index);
        let base = self.dir.join(&stem);
        if let Some(parent) = base.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        if let Some(shape) = self.video_shape {
            write_npy(&with_suffix(&base, ".video.npy"), &shape, video)?;
        }
        if let Some(shape) = self.audio_shape {
            write_npy(&with_suffix(&base, ".audio.npy"), &shape, audio)?;
        }
        let line = ManifestLine {
            file: &stem,
            label,
            source: &window.source,
            window_start: start,
            window_index: window.index,
            degraded: window.degraded.map(crate::window::Degraded::as_str),
        };
        serde_json::to_writer(&mut self.manifest, &line)?;
        self.manifest.write_all(b"\n")?;
        self.manifest.flush()?;
        Ok(stem)
    }
}

/// The recipe without labels: a dataset may be recorded with a bootstrap model whose labels
/// differ, as long as the preprocessing is the same.
fn strip_labels(value: &serde_json::Value) -> serde_json::Value {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        for key in ["labels", "name", "multi_label", "fusion"] {
            object.remove(key);
        }
    }
    value
}

fn sanitize(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}
