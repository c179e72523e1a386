//! SIGHUP: the config read again and applied between two rounds of the window stage.
//!
//! Sources whose settings changed restart alone, the others keep running; event, MQTT and
//! spool settings go to the events thread, which applies them without touching capture. A
//! config that does not validate, or that changes the model, is refused and the running one
//! stays.

use std::path::Path;

use crossbeam_channel::Sender;

use super::events::{Notice, PublishConfig};
use super::prepare::{self, Prepared};
use super::sources::Sources;
use super::stage::{StageOutput, WindowStage};
use super::state::DaemonState;
use crate::evidence::EvidenceStore;

/// Reads the config again and applies it; `Err` says why nothing was applied.
pub(super) fn apply_reload(
    config: &Path,
    current: &mut Prepared,
    sources: &mut Sources,
    state: &DaemonState,
    notices: &Sender<Notice>,
    evidence: &EvidenceStore,
    sink: &mut impl FnMut(&WindowStage, StageOutput),
) -> Result<String, String> {
    tracing::info!(config = %config.display(), "SIGHUP: reloading the configuration");
    let new = prepare::prepare(config).map_err(|failure| format!("{:#}", failure.error))?;
    if new.settings.model != current.settings.model || new.model.sha256 != current.model.sha256 {
        return Err("[model] or the model file changed; restart the daemon to load another model".into());
    }
    // The store knows the new sources before they send anything.
    evidence.configure(new.settings.evidence.clone(), &new.settings.sources);
    let changes = sources
        .reconfigure(&new, &new.settings.sources, &mut *sink)
        .map_err(|err| format!("restarting sources: {err:#}"))?;
    for source in &changes.removed {
        let _ = notices.send(Notice::SourceDone { source: source.clone() });
    }
    state.set_sources(new.settings.sources.iter().map(|source| source.name.clone()));
    let old_publish = PublishConfig::of(current);
    let new_publish = PublishConfig::of(&new);
    let events_changed = old_publish.events != new_publish.events;
    let publisher_changed = old_publish.publisher_differs(&new_publish);
    let _ = notices.send(Notice::Reload(Box::new(new_publish)));
    if new.settings.log_level != current.settings.log_level {
        tracing::warn!("[log] level changes apply at the next start");
    }
    *current = new;
    Ok(format!(
        "reloaded: sources unchanged {:?}, restarted {:?}, added {:?}, removed {:?}; events {}; mqtt/spool {}",
        changes.unchanged,
        changes.restarted,
        changes.added,
        changes.removed,
        if events_changed { "changed" } else { "unchanged" },
        if publisher_changed { "changed (publisher restarted)" } else { "unchanged" },
    ))
}
