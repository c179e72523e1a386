//! Run-time controls: labels switched off and thresholds set per source from Home Assistant
//! (or any MQTT client), kept in `<state_dir>/controls.json` so they survive restarts.
//!
//! They sit on top of config.toml: a control wins over the config's value for its source and
//! label until it is cleared (an empty payload on its `set` topic), a reload keeps it (and
//! logs it), and a label that config.toml disables stays disabled. The file is written whole,
//! to a temporary name, fsynced and renamed, so a crash leaves the old or the new file. A file
//! that cannot be read is logged and set aside, never fatal: the daemon's job is events.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::events::LabelOverride;
use crate::publish::{Control, ControlChange};

/// The name of the file in the state directory.
pub const FILE_NAME: &str = "controls.json";

/// The controls in force, by (source, label), and where they are kept.
#[derive(Debug)]
pub struct Controls {
    path: PathBuf,
    overrides: BTreeMap<(String, String), LabelOverride>,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    controls: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    source: String,
    label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    threshold: Option<f32>,
}

impl Controls {
    /// Reads `state_dir/controls.json`; a missing file is no controls, an unreadable one is
    /// logged and renamed to `controls.json.bad`.
    pub fn load(state_dir: &Path) -> Controls {
        let path = state_dir.join(FILE_NAME);
        let mut controls = Controls { path, overrides: BTreeMap::new() };
        let text = match fs::read_to_string(&controls.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return controls,
            Err(err) => {
                tracing::error!(path = %controls.path.display(), error = %err, "controls not read; starting without them");
                return controls;
            }
        };
        match serde_json::from_str::<File>(&text) {
            Ok(file) => {
                for entry in file.controls {
                    let over = LabelOverride {
                        enabled: entry.enabled,
                        threshold: entry.threshold.filter(|t| (0.0..=1.0).contains(t)),
                    };
                    if !over.is_empty() {
                        controls.overrides.insert((entry.source, entry.label), over);
                    }
                }
            }
            Err(err) => {
                let aside = controls.path.with_extension("json.bad");
                tracing::error!(
                    path = %controls.path.display(),
                    error = %err,
                    moved_to = %aside.display(),
                    "controls file unreadable; set aside, starting without controls"
                );
                let _ = fs::rename(&controls.path, &aside);
            }
        }
        controls
    }

    /// Every control in force.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &LabelOverride)> {
        self.overrides.iter().map(|((source, label), over)| (source.as_str(), label.as_str(), over))
    }

    /// Applies `control` and writes the file; returns the label's override now in force.
    pub fn apply(&mut self, control: &Control) -> LabelOverride {
        let key = (control.source.clone(), control.label.clone());
        let mut over = self.overrides.get(&key).copied().unwrap_or_default();
        match control.change {
            ControlChange::Enabled(enabled) => over.enabled = enabled,
            ControlChange::Threshold(threshold) => over.threshold = threshold,
        }
        if over.is_empty() {
            self.overrides.remove(&key);
        } else {
            self.overrides.insert(key, over);
        }
        if let Err(err) = self.save() {
            tracing::error!(path = %self.path.display(), error = %err, "controls not saved; they apply until the daemon stops");
        }
        over
    }

    fn save(&self) -> std::io::Result<()> {
        let file = File {
            version: 1,
            controls: self
                .overrides
                .iter()
                .map(|((source, label), over)| Entry {
                    source: source.clone(),
                    label: label.clone(),
                    enabled: over.enabled,
                    threshold: over.threshold,
                })
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        let temporary = self.path.with_extension("json.tmp");
        let mut out = fs::File::create(&temporary)?;
        out.write_all(&text)?;
        out.sync_all()?;
        fs::rename(&temporary, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(source: &str, label: &str, change: ControlChange) -> Control {
        Control { source: source.to_owned(), label: label.to_owned(), change }
    }

    #[test]
    fn controls_are_kept_across_loads_and_cleared_by_an_empty_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut controls = Controls::load(dir.path());
        assert_eq!(controls.iter().count(), 0);
        controls.apply(&control("porch", "dog bark", ControlChange::Enabled(Some(false))));
        let over = controls.apply(&control("porch", "dog bark", ControlChange::Threshold(Some(0.8))));
        assert_eq!(over, LabelOverride { enabled: Some(false), threshold: Some(0.8) });
        controls.apply(&control("yard", "car", ControlChange::Threshold(Some(0.3))));
        controls.apply(&control("yard", "car", ControlChange::Threshold(None)));

        let again = Controls::load(dir.path());
        let kept: Vec<(&str, &str, LabelOverride)> = again.iter().map(|(s, l, o)| (s, l, *o)).collect();
        assert_eq!(kept, [("porch", "dog bark", LabelOverride { enabled: Some(false), threshold: Some(0.8) })]);
    }

    #[test]
    fn an_unreadable_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), "{ not json").unwrap();
        let controls = Controls::load(dir.path());
        assert_eq!(controls.iter().count(), 0);
        assert!(dir.path().join("controls.json.bad").exists());
        assert!(!dir.path().join(FILE_NAME).exists());
    }
}
