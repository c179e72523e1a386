//! The model's metadata (`metadata_props` key `mbt`, see models/METADATA.md): labels, the
//! preprocessing recipe and the architecture, read from the ONNX file and checked against its
//! graph inputs. A model without it is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

use crate::window::VideoSpan;

/// The `mbt` metadata entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMetadata {
    pub format_version: u32,
    pub name: String,
    pub labels: Vec<String>,
    pub multi_label: bool,
    pub window_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<VideoRecipe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioRecipe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoRecipe {
    pub frames: usize,
    pub height: u32,
    pub width: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// The frames cover this many seconds of the window (default: the whole window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_seconds: Option<f64>,
    /// Where that span sits in the window (default: the centre).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_position: Option<SpanPosition>,
}

/// `video.span_position`: the span's place in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanPosition {
    #[default]
    Centre,
    Start,
    End,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioRecipe {
    pub sample_rate: u32,
    pub n_frames: usize,
    pub n_mels: usize,
    pub win_length: usize,
    pub hop_length: usize,
    pub n_fft: usize,
    pub window: String,
    pub mel_scale: String,
    pub fmin: f64,
    pub fmax: f64,
    pub power: f64,
    pub log_offset: f64,
    pub mean: f64,
    pub std: f64,
}

/// Why a model file is refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read the model: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid ONNX model: {message}")]
    NotOnnx { path: PathBuf, message: String },
    #[error(
        "{path}: the model has no `mbt` metadata entry; export it with `python -m mbt export` (see models/METADATA.md)"
    )]
    NoMetadata { path: PathBuf },
    #[error("{path}: the `mbt` metadata is malformed: {message}")]
    BadMetadata { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Mismatch { path: PathBuf, message: String },
}

/// A model file's identity and metadata, read without building the runtime.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub metadata: ModelMetadata,
    pub proto: pb::ModelProto,
}

impl ModelMetadata {
    pub fn window_length(&self) -> Duration {
        Duration::from_secs_f64(self.window_seconds)
    }

    /// The part of the window the video frames come from (`video.span_seconds` and
    /// `video.span_position`); `None`: the whole window.
    pub fn video_span(&self) -> Option<VideoSpan> {
        let video = self.video.as_ref()?;
        let length = Duration::from_secs_f64(video.span_seconds?).min(self.window_length());
        let room = self.window_length() - length;
        let offset = match video.span_position.unwrap_or_default() {
            SpanPosition::Centre => room / 2,
            SpanPosition::Start => Duration::ZERO,
            SpanPosition::End => room,
        };
        Some(VideoSpan { offset, length })
    }

    /// Checks internal consistency (see models/METADATA.md).
    pub fn check(&self) -> Result<(), String> {
        if self.format_version != 1 {
            return Err(format!("format_version {} is not supported (this daemon reads 1)", self.format_version));
        }
        if self.labels.is_empty() {
            return Err("`labels` is empty".into());
        }
        if !(self.window_seconds > 0.0 && self.window_seconds <= 60.0) {
            return Err(format!("window_seconds {} is out of range (0, 60]", self.window_seconds));
        }
        if self.video.is_none() && self.audio.is_none() {
            return Err("neither `video` nor `audio` is described".into());
        }
        if let Some(video) = &self.video {
            if video.frames == 0 || video.width == 0 || video.height == 0 {
                return Err("video frames, width and height must be positive".into());
            }
            if video.std.iter().any(|std| *std <= 0.0) {
                return Err("video std must be positive".into());
            }
            if let Some(span) = video.span_seconds
                && !(span > 0.0 && span <= self.window_seconds)
            {
                return Err(format!("video.span_seconds {span} is out of range (0, window_seconds]"));
            }
        }
        if let Some(audio) = &self.audio {
            let samples = self.window_seconds * audio.sample_rate as f64;
            if (samples - samples.round()).abs() > 1e-6 {
                return Err(format!("window_seconds * sample_rate = {samples} is not a whole number of samples"));
            }
            let expected_frames = samples.round() as usize / audio.hop_length.max(1);
            if audio.n_frames != expected_frames || !(samples.round() as usize).is_multiple_of(audio.hop_length.max(1))
            {
                return Err(format!(
                    "audio.n_frames {} does not match window_seconds * sample_rate / hop_length = {expected_frames}",
                    audio.n_frames
                ));
            }
            if audio.win_length == 0 || audio.win_length > audio.n_fft || audio.hop_length == 0 {
                return Err("audio needs 0 < win_length <= n_fft and hop_length > 0".into());
            }
            if audio.window != "hann" {
                return Err(format!("audio.window {:?} is not supported (hann)", audio.window));
            }
            if audio.mel_scale != "htk" {
                return Err(format!("audio.mel_scale {:?} is not supported (htk)", audio.mel_scale));
            }
            if !(audio.fmin >= 0.0 && audio.fmin < audio.fmax && audio.fmax <= audio.sample_rate as f64 / 2.0) {
                return Err("audio needs 0 <= fmin < fmax <= sample_rate / 2".into());
            }
            if audio.std <= 0.0 || audio.log_offset <= 0.0 {
                return Err("audio std and log_offset must be positive".into());
            }
        }
        Ok(())
    }
}

impl ModelInfo {
    /// Reads the file, its metadata and checks both against the graph's inputs and outputs.
    pub fn read(path: &Path) -> Result<ModelInfo, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Read { path: path.to_path_buf(), source })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|err| ModelError::NotOnnx { path: path.to_path_buf(), message: format!("{err:#}") })?;
        if proto.graph.is_none() {
            return Err(ModelError::NotOnnx { path: path.to_path_buf(), message: "no graph".into() });
        }
        let entry = proto
            .metadata_props
            .iter()
            .find(|entry| entry.key == "mbt")
            .ok_or_else(|| ModelError::NoMetadata { path: path.to_path_buf() })?;
        let metadata: ModelMetadata = serde_json::from_str(&entry.value)
            .map_err(|err| ModelError::BadMetadata { path: path.to_path_buf(), message: err.to_string() })?;
        metadata.check().map_err(|message| ModelError::BadMetadata { path: path.to_path_buf(), message })?;
        let info = ModelInfo { path: path.to_path_buf(), sha256, metadata, proto };
        info.check_graph().map_err(|message| ModelError::Mismatch { path: path.to_path_buf(), message })?;
        Ok(info)
    }

    /// The name shown in events: the metadata's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    fn check_graph(&self) -> Result<(), String> {
        let graph = self.proto.graph.as_ref().ok_or("no graph")?;
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|init| init.name.as_str()).collect();
        let inputs: Vec<&pb::ValueInfoProto> =
            graph.input.iter().filter(|input| !initializers.contains(input.name.as_str())).collect();
        let find = |name: &str| inputs.iter().find(|input| input.name == name).copied();
        let classes = self.metadata.labels.len();
        if let Some(video) = &self.metadata.video {
            let input = find("video").ok_or("the metadata describes video but the graph has no `video` input")?;
            let expected = [video.frames as i64, 3, video.height as i64, video.width as i64];
            check_dims("video", input, &expected)?;
        } else if find("video").is_some() {
            return Err("the graph has a `video` input the metadata does not describe".into());
        }
        if let Some(audio) = &self.metadata.audio {
            let input = find("audio").ok_or("the metadata describes audio but the graph has no `audio` input")?;
            check_dims("audio", input, &[audio.n_frames as i64, audio.n_mels as i64])?;
        } else if find("audio").is_some() {
            return Err("the graph has an `audio` input the metadata does not describe".into());
        }
        let mut outputs = vec!["logits"];
        if self.metadata.audio.is_some() {
            outputs.push("logits_audio");
        }
        if self.metadata.video.is_some() {
            outputs.push("logits_video");
        }
        for name in outputs {
            let output = graph
                .output
                .iter()
                .find(|output| output.name == name)
                .ok_or(format!("the graph has no `{name}` output"))?;
            check_dims(name, output, &[classes as i64])?;
        }
        Ok(())
    }
}

/// Checks `[batch, dims...]` where the first dimension may be symbolic.
fn check_dims(name: &str, value: &pb::ValueInfoProto, expected: &[i64]) -> Result<(), String> {
    use pb::tensor_shape_proto::dimension::Value;
    use pb::type_proto::Value as TypeValue;
    let Some(TypeValue::TensorType(tensor)) = value.r#type.as_ref().and_then(|ty| ty.value.as_ref()) else {
        return Err(format!("`{name}` is not a tensor"));
    };
    if tensor.elem_type != pb::tensor_proto::DataType::Float as i32 {
        return Err(format!("`{name}` must be float32"));
    }
    let Some(shape) = &tensor.shape else { return Err(format!("`{name}` has no shape")) };
    let dims: Vec<Option<i64>> = shape
        .dim
        .iter()
        .map(|dim| match &dim.value {
            Some(Value::DimValue(value)) => Some(*value),
            _ => None,
        })
        .collect();
    let wanted: Vec<String> = std::iter::once("N".to_string()).chain(expected.iter().map(i64::to_string)).collect();
    let got: Vec<String> = dims.iter().map(|dim| dim.map_or("?".to_string(), |d| d.to_string())).collect();
    if dims.len() != expected.len() + 1 || dims[1..].iter().zip(expected).any(|(got, want)| *got != Some(*want)) {
        return Err(format!("`{name}` has shape [{}], the metadata says [{}]", got.join(", "), wanted.join(", ")));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
