//! Retention of the evidence dir: beyond `max_bytes`, or older than `max_age`, files go,
//! oldest first; each deletion is counted. Partial files of a write that died with the
//! daemon are removed once they are an hour old.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::telemetry;

/// Retention runs from the store and the clip thread; one at a time.
static RUNNING: Mutex<()> = Mutex::new(());

const STALE_PARTIAL: Duration = Duration::from_secs(3600);

/// Applies the limits to `dir` (`<dir>/<source>/<file>`); returns the files and bytes left.
pub fn enforce(dir: &Path, max_bytes: u64, max_age: Duration) -> (u64, u64) {
    let _one = RUNNING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = SystemTime::now();
    let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    for folder in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(folder.path()).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(now);
            let path = entry.path();
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            // Only what the store writes: `<id>.jpg|webm|mp4` and `.<name>.part`. Anything
            // else (a dir set to a folder that holds other files) is left alone.
            let partial = name.starts_with('.') && name.ends_with(".part");
            let ours = name.rsplit_once('.').is_some_and(|(stem, extension)| {
                matches!(extension, "jpg" | "webm" | "mp4")
                    && !stem.is_empty()
                    && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
            if !partial && !ours {
                continue;
            }
            if partial {
                if now.duration_since(modified).unwrap_or_default() > STALE_PARTIAL {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            files.push((modified, meta.len(), path));
        }
    }
    files.sort();
    let mut total: u64 = files.iter().map(|file| file.1).sum();
    let mut count = files.len() as u64;
    for (modified, bytes, path) in files {
        let old = now.duration_since(modified).unwrap_or_default() > max_age;
        if !old && total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            telemetry::evidence_deleted(&path, bytes, if old { "max_age" } else { "max_bytes" });
            total -= bytes;
            count -= 1;
        }
    }
    telemetry::evidence_held(count, total);
    (count, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_files_go_first_until_the_rest_fits_and_each_deletion_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (idx, source) in ["a", "b", "a", "b"].iter().enumerate() {
            let folder = dir.path().join(source);
            std::fs::create_dir_all(&folder).expect("mkdir");
            let path = folder.join(format!("{idx}.jpg"));
            std::fs::write(&path, vec![0u8; 1000]).expect("write");
            let at = SystemTime::now() - Duration::from_secs(100 - idx as u64);
            std::fs::File::options().write(true).open(&path).expect("open").set_modified(at).expect("mtime");
        }
        let deleted_before = telemetry::evidence().deleted;
        assert_eq!(enforce(dir.path(), 2500, Duration::from_secs(3600)), (2, 2000));
        assert!(!dir.path().join("a/0.jpg").exists() && !dir.path().join("b/1.jpg").exists());
        assert!(dir.path().join("a/2.jpg").exists() && dir.path().join("b/3.jpg").exists());
        assert!(telemetry::evidence().deleted >= deleted_before + 2);
        // Age: everything is older than 10 s; a file the store did not write stays.
        std::fs::write(dir.path().join("a/spool.log"), b"not evidence").expect("write");
        assert_eq!(enforce(dir.path(), 1 << 30, Duration::from_secs(10)), (0, 0));
        assert!(dir.path().join("a/spool.log").exists());
    }
}
