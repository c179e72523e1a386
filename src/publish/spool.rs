//! The durable event spool: every event is appended and fsynced here before it is published,
//! and removed only when the broker has acknowledged it, so a broker outage or a SIGKILL
//! loses nothing that was appended. It also owns the per-device `seq` counter, which keeps
//! increasing across restarts.
//!
//! On disk (one directory per device):
//! - `seg-<first seq, 20 digits>.log`: append-only segments of framed records
//!   (`magic, len, crc32, seq, appended unix ms, payload`). A segment is deleted once every
//!   record in it is acknowledged or dropped and a newer segment exists.
//! - `acks.log`: seqs acknowledged or dropped (8 bytes each, little endian); not fsynced, so
//!   a crash can at worst make an acknowledged event go out twice (at-least-once).
//! - `seq`: the next seq, written atomically before a segment is deleted, so the counter
//!   survives an empty spool.
//!
//! A damaged record (the half-written tail left by a SIGKILL or power cut) ends the reading of
//! its segment with a warning; it is never fatal. The spool is bounded by the bytes of its
//! live records (disk use can exceed that by up to one segment) and by their age; overflow
//! drops the oldest records with a counter and a log line. Live payloads are also kept in
//! memory for replay, so `max_bytes` bounds memory too. This module knows nothing of MQTT.
//!
//! A disk that stops taking writes (full, read-only, failing, the directory removed) loses
//! nothing either: a record that cannot be written still gets its seq and stays live in
//! memory only ([`SpoolStats::unwritten`], [`Spool::unwritable`]), so it is published and
//! acknowledged as usual; every later append and [`Spool::retry_writes`] first write such
//! records back, in seq order, once the disk takes them again. The `max_bytes` bound covers
//! them too, so only its overflow drops (with the seq gap and counter it always leaves). What
//! sits only in memory does not survive a crash, and its seqs may be handed out again after
//! one: the best a disk that takes nothing allows.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::delivery::SpoolSettings;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("spool file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("spool record of {len} bytes is larger than the 16 MiB a record may have")]
    RecordTooLarge { len: usize },
}

/// One unacknowledged record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledRecord {
    pub seq: u64,
    pub appended_at: SystemTime,
    pub payload: Vec<u8>,
}

/// Counters a stats message reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolStats {
    pub records: u64,
    pub bytes: u64,
    pub next_seq: u64,
    pub dropped_overflow: u64,
    pub dropped_age: u64,
    pub corrupt_records_skipped: u64,
    /// Live records held in memory only, because the disk did not take them (yet).
    pub unwritten: u64,
}

/// The spool of one device; one owner (the publisher's worker thread), no locking.
#[derive(Debug)]
pub struct Spool {
    settings: SpoolSettings,
    segment_bytes: u64,
    next_seq: u64,
    /// Live records by seq, with the segment (its first seq) each lives in.
    live: BTreeMap<u64, LiveRecord>,
    live_bytes: u64,
    /// Segments by first seq: their file and how many of their records are live.
    segments: BTreeMap<u64, Segment>,
    active: Option<ActiveSegment>,
    acks: File,
    acks_written: u64,
    stats: SpoolStats,
    /// Live records not on disk, in seq order: each is written back before any newer one.
    unwritten: std::collections::VecDeque<u64>,
    /// Acks of on-disk records that `acks.log` did not take, written back with them.
    unwritten_acks: Vec<u64>,
    /// Why the disk refuses writes, while it does.
    unwritable: Option<String>,
}

impl Spool {
    /// Opens (creating if needed) the spool directory and recovers what a previous run left.
    pub fn open(settings: SpoolSettings) -> Result<Spool, SpoolError> {
        Self::open_at(settings, SystemTime::now())
    }

    fn open_at(settings: SpoolSettings, now: SystemTime) -> Result<Spool, SpoolError> {
        let dir = settings.dir.clone();
        fs::create_dir_all(&dir).map_err(|source| SpoolError::Dir { path: dir.clone(), source })?;
        let seq_floor = read_seq_file(&dir)?;
        let acked = read_acks(&dir.join(ACKS_FILE))?;

        let mut segment_firsts = Vec::new();
        let entries = fs::read_dir(&dir).map_err(|source| SpoolError::Dir { path: dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| SpoolError::Dir { path: dir.clone(), source })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(first) = name
                .strip_prefix("seg-")
                .and_then(|rest| rest.strip_suffix(".log"))
                .and_then(|digits| digits.parse::<u64>().ok())
            {
                segment_firsts.push(first);
            }
        }
        segment_firsts.sort_unstable();

        let mut stats = SpoolStats::default();
        let mut live = BTreeMap::new();
        let mut segments = BTreeMap::new();
        let mut max_seq_seen = 0;
        let n_segments = segment_firsts.len();
        for (segment_idx, first) in segment_firsts.into_iter().enumerate() {
            let path = segment_path(&dir, first);
            let (records, good_len, corrupt) = read_segment(&path)?;
            if corrupt {
                stats.corrupt_records_skipped += 1;
                tracing::warn!(
                    path = %path.display(),
                    good_bytes = good_len,
                    "spool segment has a damaged record; skipping the rest of it"
                );
                if segment_idx + 1 == n_segments {
                    truncate(&path, good_len)?;
                }
            }
            let mut segment = Segment { live: 0, seqs: Vec::new() };
            for record in records {
                max_seq_seen = max_seq_seen.max(record.seq);
                segment.seqs.push(record.seq);
                if acked.contains(&record.seq) {
                    continue;
                }
                segment.live += 1;
                live.insert(
                    record.seq,
                    LiveRecord {
                        segment: Some(first),
                        framed_len: (HEADER_LEN + record.payload.len()) as u64,
                        appended_ms: record.appended_ms,
                        payload: record.payload,
                    },
                );
            }
            segments.insert(first, segment);
        }
        let live_bytes = live.values().map(|r| r.framed_len).sum();
        let acks = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(ACKS_FILE))
            .map_err(|source| SpoolError::File { path: dir.join(ACKS_FILE), source })?;
        let next_seq = seq_floor.max(max_seq_seen + 1).max(1);
        stats.next_seq = next_seq;
        let segment_bytes = (settings.max_bytes / 16).clamp(4096, 4 * 1024 * 1024);
        let mut spool = Spool {
            settings,
            segment_bytes,
            next_seq,
            live,
            live_bytes,
            segments,
            active: None,
            acks,
            acks_written: acked.len() as u64,
            stats,
            unwritten: Default::default(),
            unwritten_acks: Vec::new(),
            unwritable: None,
        };
        spool.drop_expired(now)?;
        spool.delete_dead_segments()?;
        spool.refresh_stats();
        tracing::info!(
            dir = %spool.settings.dir.display(),
            records = spool.live.len(),
            bytes = spool.live_bytes,
            next_seq = spool.next_seq,
            "spool opened"
        );
        Ok(spool)
    }

    /// Assigns the next seq, lets `make_payload` build the record for it, appends and
    /// fsyncs it. Returns the seq. Drops the oldest records first if the bounds require.
    pub fn append(&mut self, make_payload: impl FnOnce(u64) -> Vec<u8>) -> Result<u64, SpoolError> {
        self.append_at(SystemTime::now(), make_payload)
    }

    fn append_at(&mut self, now: SystemTime, make_payload: impl FnOnce(u64) -> Vec<u8>) -> Result<u64, SpoolError> {
        let seq = self.next_seq;
        let payload = make_payload(seq);
        if payload.len() > MAX_PAYLOAD {
            return Err(SpoolError::RecordTooLarge { len: payload.len() });
        }
        let framed_len = (HEADER_LEN + payload.len()) as u64;
        self.drop_expired(now)?;
        while !self.live.is_empty() && self.live_bytes + framed_len > self.settings.max_bytes {
            let (&oldest, _) = self.live.iter().next().expect("live is not empty");
            self.stats.dropped_overflow += 1;
            tracing::warn!(
                seq = oldest,
                max_bytes = self.settings.max_bytes,
                dropped_total = self.stats.dropped_overflow,
                "spool full: dropped the oldest event"
            );
            self.forget(oldest)?;
        }

        let appended_ms = unix_ms(now);
        self.live.insert(seq, LiveRecord { segment: None, framed_len, appended_ms, payload });
        self.live_bytes += framed_len;
        self.next_seq = seq + 1;
        self.unwritten.push_back(seq);
        self.retry_writes();
        self.refresh_stats();
        Ok(seq)
    }

    /// Writes records and acks the disk did not take, oldest first, stopping at the first
    /// refusal. Returns whether everything is on disk now.
    pub fn retry_writes(&mut self) -> bool {
        while let Some(&seq) = self.unwritten.front() {
            match self.write_record(seq) {
                Ok(()) => {
                    self.unwritten.pop_front();
                }
                Err(err) => {
                    self.refused(&err);
                    self.refresh_stats();
                    return false;
                }
            }
        }
        while let Some(&seq) = self.unwritten_acks.last() {
            if let Err(source) = self.acks.write_all(&seq.to_le_bytes()) {
                let err = SpoolError::File { path: self.settings.dir.join(ACKS_FILE), source };
                self.refused(&err);
                return false;
            }
            self.acks_written += 1;
            self.unwritten_acks.pop();
        }
        if self.unwritable.is_some() {
            // Nothing was waiting (held records may have been acked straight from memory):
            // only a write that goes through says the disk takes writes again.
            if let Err(err) = self.probe() {
                self.refused(&err);
                return false;
            }
        }
        if let Some(reason) = self.unwritable.take() {
            tracing::info!(dir = %self.settings.dir.display(), was = reason, "spool writable again; held events are on disk");
        }
        let _ = self.delete_dead_segments();
        self.refresh_stats();
        true
    }

    /// Writes, fsyncs and removes a small file in the spool directory.
    fn probe(&self) -> Result<(), SpoolError> {
        let path = self.settings.dir.join(".probe");
        let written = fs::create_dir_all(&self.settings.dir)
            .and_then(|()| File::create(&path))
            .and_then(|mut file| file.write_all(&[0u8; 512]).and_then(|()| file.sync_all()));
        let _ = fs::remove_file(&path);
        written.map_err(|source| SpoolError::File { path, source })
    }

    /// Why the disk refuses writes, while it does (records are then held in memory).
    pub fn unwritable(&self) -> Option<&str> {
        self.unwritable.as_deref()
    }

    fn refused(&mut self, err: &SpoolError) {
        if self.unwritable.is_none() {
            tracing::error!(
                dir = %self.settings.dir.display(),
                error = %err,
                held = self.unwritten.len(),
                "spool cannot write: events are held in memory and published from there until the disk takes them"
            );
        }
        self.unwritable = Some(err.to_string());
    }

    /// Appends and fsyncs live record `seq` (held in memory so far) to the active segment.
    fn write_record(&mut self, seq: u64) -> Result<(), SpoolError> {
        let Some(record) = self.live.get(&seq) else { return Ok(()) };
        let (framed_len, appended_ms) = (record.framed_len, record.appended_ms);
        if !self.settings.dir.is_dir() {
            // Removed under us: make it again (and forget the segments that went with it).
            fs::create_dir_all(&self.settings.dir)
                .map_err(|source| SpoolError::Dir { path: self.settings.dir.clone(), source })?;
            self.active = None;
        }
        let rotate = self.active.as_ref().is_none_or(|a| a.len + framed_len > self.segment_bytes && a.len > 0);
        if rotate {
            self.start_segment(seq)?;
        }
        let frame = encode_record(seq, appended_ms, &self.live[&seq].payload);
        let active = self.active.as_mut().expect("an active segment after rotation");
        let write = active.file.write_all(&frame).and_then(|()| active.file.sync_data());
        if let Err(source) = write {
            // Leave no half record behind for the next write to follow.
            let _ = active.file.set_len(active.len);
            return Err(SpoolError::File { path: segment_path(&self.settings.dir, active.first), source });
        }
        active.len += framed_len;
        let segment_first = active.first;
        let segment = self.segments.get_mut(&segment_first).expect("active segment is registered");
        segment.live += 1;
        segment.seqs.push(seq);
        if let Some(record) = self.live.get_mut(&seq) {
            record.segment = Some(segment_first);
        }
        Ok(())
    }

    /// Removes an acknowledged record. Unknown seqs (already acked, dropped) are ignored.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        if self.live.contains_key(&seq) {
            self.forget(seq)?;
            if let Err(err) = self.delete_dead_segments() {
                // A dead segment left on a full disk is deleted by a later ack or retry.
                self.refused(&err);
            }
            self.refresh_stats();
        }
        Ok(())
    }

    /// Unacknowledged records in seq order, after dropping those older than `max_age`.
    pub fn pending(&mut self) -> Result<Vec<SpooledRecord>, SpoolError> {
        self.drop_expired(SystemTime::now())?;
        self.refresh_stats();
        Ok(self
            .live
            .iter()
            .map(|(&seq, r)| SpooledRecord {
                seq,
                appended_at: UNIX_EPOCH + Duration::from_millis(r.appended_ms),
                payload: r.payload.clone(),
            })
            .collect())
    }

    /// The payload of a live record.
    pub fn get(&self, seq: u64) -> Option<&[u8]> {
        self.live.get(&seq).map(|r| r.payload.as_slice())
    }

    pub fn is_live(&self, seq: u64) -> bool {
        self.live.contains_key(&seq)
    }

    pub fn stats(&self) -> SpoolStats {
        self.stats
    }

    pub fn dir(&self) -> &Path {
        &self.settings.dir
    }

    fn refresh_stats(&mut self) {
        self.stats.records = self.live.len() as u64;
        self.stats.bytes = self.live_bytes;
        self.stats.next_seq = self.next_seq;
        self.stats.unwritten = self.unwritten.len() as u64;
    }

    fn drop_expired(&mut self, now: SystemTime) -> Result<(), SpoolError> {
        let now_ms = unix_ms(now);
        let max_age_ms = self.settings.max_age.as_millis() as u64;
        let expired: Vec<u64> = self
            .live
            .iter()
            .take_while(|(_, r)| now_ms.saturating_sub(r.appended_ms) > max_age_ms)
            .map(|(&seq, _)| seq)
            .collect();
        for seq in expired {
            self.stats.dropped_age += 1;
            tracing::warn!(
                seq,
                max_age_s = self.settings.max_age.as_secs(),
                dropped_total = self.stats.dropped_age,
                "spooled event too old: dropped"
            );
            self.forget(seq)?;
        }
        Ok(())
    }

    /// Marks a record done (acked or dropped) in memory and in `acks.log`.
    fn forget(&mut self, seq: u64) -> Result<(), SpoolError> {
        let Some(record) = self.live.remove(&seq) else {
            return Ok(());
        };
        self.live_bytes -= record.framed_len;
        let Some(segment_first) = record.segment else {
            // Never written: nothing on disk to mark.
            self.unwritten.retain(|&unwritten| unwritten != seq);
            return Ok(());
        };
        if let Some(segment) = self.segments.get_mut(&segment_first) {
            segment.live -= 1;
        }
        if let Err(source) = self.acks.write_all(&seq.to_le_bytes()) {
            // Kept to write later; lost with a crash, the record then goes out twice.
            self.unwritten_acks.push(seq);
            self.refused(&SpoolError::File { path: self.settings.dir.join(ACKS_FILE), source });
            return Ok(());
        }
        self.acks_written += 1;
        Ok(())
    }

    /// Deletes segments without live records (never the active one), after persisting the
    /// next seq so that the counter survives; compacts `acks.log` now and then.
    fn delete_dead_segments(&mut self) -> Result<(), SpoolError> {
        let active_first = self.active.as_ref().map(|a| a.first);
        let dead: Vec<u64> = self
            .segments
            .iter()
            .filter(|(first, s)| s.live == 0 && Some(**first) != active_first)
            .map(|(&first, _)| first)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        write_seq_file(&self.settings.dir, self.next_seq)?;
        for first in dead {
            let path = segment_path(&self.settings.dir, first);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(SpoolError::File { path, source }),
            }
            self.segments.remove(&first);
        }
        let n_known: usize = self.segments.values().map(|s| s.seqs.len()).sum();
        if self.acks_written > 4096 && self.acks_written as usize > 2 * n_known {
            self.compact_acks()?;
        }
        Ok(())
    }

    /// Rewrites `acks.log` with only the acks of records still in a segment.
    fn compact_acks(&mut self) -> Result<(), SpoolError> {
        let dir = self.settings.dir.clone();
        let tmp = dir.join("acks.log.tmp");
        let mut bytes = Vec::new();
        let mut n = 0;
        for segment in self.segments.values() {
            for seq in &segment.seqs {
                if !self.live.contains_key(seq) {
                    bytes.extend_from_slice(&seq.to_le_bytes());
                    n += 1;
                }
            }
        }
        let file_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SpoolError::File { path, source }
        };
        let mut file = File::create(&tmp).map_err(file_err(&tmp))?;
        file.write_all(&bytes).map_err(file_err(&tmp))?;
        file.sync_all().map_err(file_err(&tmp))?;
        fs::rename(&tmp, dir.join(ACKS_FILE)).map_err(file_err(&tmp))?;
        sync_dir(&dir)?;
        self.acks =
            OpenOptions::new().append(true).open(dir.join(ACKS_FILE)).map_err(file_err(&dir.join(ACKS_FILE)))?;
        self.acks_written = n;
        Ok(())
    }

    fn start_segment(&mut self, first: u64) -> Result<(), SpoolError> {
        let path = segment_path(&self.settings.dir, first);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| SpoolError::File { path: path.clone(), source })?;
        let len = file.metadata().map_err(|source| SpoolError::File { path, source })?.len();
        sync_dir(&self.settings.dir)?;
        self.segments.entry(first).or_insert(Segment { live: 0, seqs: Vec::new() });
        self.active = Some(ActiveSegment { first, file, len });
        self.delete_dead_segments()
    }
}

const ACKS_FILE: &str = "acks.log";
const SEQ_FILE: &str = "seq";
const MAGIC: u32 = 0x4d42_4553; // "MBES"
/// magic, len, crc32 (u32 each), seq, appended unix ms (u64 each).
const HEADER_LEN: usize = 28;
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

#[derive(Debug)]
struct LiveRecord {
    /// The segment (its first seq) holding it; `None` while it is held in memory only.
    segment: Option<u64>,
    framed_len: u64,
    appended_ms: u64,
    payload: Vec<u8>,
}

#[derive(Debug)]
struct Segment {
    live: u64,
    seqs: Vec<u64>,
}

#[derive(Debug)]
struct ActiveSegment {
    first: u64,
    file: File,
    len: u64,
}

struct DecodedRecord {
    seq: u64,
    appended_ms: u64,
    payload: Vec<u8>,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.log"))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn encode_record(seq: u64, appended_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + payload.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(&appended_ms.to_le_bytes());
    body.extend_from_slice(payload);
    let mut frame = Vec::with_capacity(12 + body.len());
    frame.extend_from_slice(&MAGIC.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32(&body).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Reads a segment's good records; returns them, the length of the good prefix and whether
/// anything after it was damaged.
fn read_segment(path: &Path) -> Result<(Vec<DecodedRecord>, u64, bool), SpoolError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| SpoolError::File { path: path.to_path_buf(), source })?;
    let mut records = Vec::new();
    let mut offset = 0usize;
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        if rest.len() < HEADER_LEN || u32_at(rest, 0) != MAGIC {
            return Ok((records, offset as u64, true));
        }
        let len = u32_at(rest, 4) as usize;
        if len > MAX_PAYLOAD || rest.len() < HEADER_LEN + len {
            return Ok((records, offset as u64, true));
        }
        let body = &rest[12..HEADER_LEN + len];
        if crc32(body) != u32_at(rest, 8) {
            return Ok((records, offset as u64, true));
        }
        records.push(DecodedRecord {
            seq: u64_at(rest, 12),
            appended_ms: u64_at(rest, 20),
            payload: rest[HEADER_LEN..HEADER_LEN + len].to_vec(),
        });
        offset += HEADER_LEN + len;
    }
    Ok((records, offset as u64, false))
}

fn truncate(path: &Path, len: u64) -> Result<(), SpoolError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len).and_then(|()| f.sync_all()))
        .map_err(|source| SpoolError::File { path: path.to_path_buf(), source })
}

fn read_acks(path: &Path) -> Result<HashSet<u64>, SpoolError> {
    match fs::read(path) {
        // A partial trailing entry (crash mid-write) is ignored by chunks_exact.
        Ok(bytes) => Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(source) => Err(SpoolError::File { path: path.to_path_buf(), source }),
    }
}

fn read_seq_file(dir: &Path) -> Result<u64, SpoolError> {
    let path = dir.join(SEQ_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(path = %path.display(), "spool seq file unreadable; using the segments");
            0
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(SpoolError::File { path, source }),
    }
}

fn write_seq_file(dir: &Path, next_seq: u64) -> Result<(), SpoolError> {
    let tmp = dir.join("seq.tmp");
    let err = |source| SpoolError::File { path: tmp.clone(), source };
    let mut file = File::create(&tmp).map_err(err)?;
    file.write_all(format!("{next_seq}\n").as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, dir.join(SEQ_FILE)).map_err(err)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| SpoolError::Dir { path: dir.to_path_buf(), source })
}

/// CRC-32 (IEEE), as zlib computes it.
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, max_bytes: u64) -> SpoolSettings {
        SpoolSettings { dir: dir.to_path_buf(), max_bytes, max_age: Duration::from_secs(3600) }
    }

    fn payloads(spool: &mut Spool) -> Vec<(u64, String)> {
        spool.pending().unwrap().into_iter().map(|r| (r.seq, String::from_utf8(r.payload).unwrap())).collect()
    }

    /// Runs `ops` against a spool in `dir` ("a:text" appends, "k:seq" acks, "r" reopens,
    /// "t:n" chops n bytes off the newest segment, then reopens) and compares the pending
    /// records with `expected` ("seq=text" joined by spaces).
    fn check(dir: &Path, max_bytes: u64, ops: &[&str], expected: &str) -> Spool {
        let mut spool = Spool::open(settings(dir, max_bytes)).unwrap();
        for op in ops {
            match op.split_once(':') {
                Some(("a", text)) => {
                    let text = text.to_owned();
                    spool.append(|_| text.into_bytes()).unwrap();
                }
                Some(("k", seq)) => spool.ack(seq.parse().unwrap()).unwrap(),
                Some(("t", n)) => {
                    drop(spool);
                    let newest = fs::read_dir(dir)
                        .unwrap()
                        .map(|e| e.unwrap().path())
                        .filter(|p| p.to_string_lossy().ends_with(".log"))
                        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
                        .max()
                        .unwrap();
                    let len = fs::metadata(&newest).unwrap().len();
                    truncate(&newest, len - n.parse::<u64>().unwrap()).unwrap();
                    spool = Spool::open(settings(dir, max_bytes)).unwrap();
                }
                None if *op == "r" => {
                    drop(spool);
                    spool = Spool::open(settings(dir, max_bytes)).unwrap();
                }
                _ => panic!("bad op {op}"),
            }
        }
        let got: Vec<String> = payloads(&mut spool).into_iter().map(|(seq, text)| format!("{seq}={text}")).collect();
        assert_eq!(got.join(" "), expected);
        spool
    }

    #[test]
    fn a_removed_directory_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let mut spool = Spool::open(settings(&spool_dir, 1 << 20)).unwrap();
        spool.append(|_| b"x".to_vec()).unwrap();
        fs::remove_dir_all(&spool_dir).unwrap();
        spool.append(|_| b"y".to_vec()).unwrap();
        assert_eq!(spool.unwritable(), None);
        drop(spool);
        // "x" went with the directory; "y" and the seq counter are on disk again.
        check(&spool_dir, 1 << 20, &["r"], "2=y");
    }

    #[test]
    fn appends_survive_reopen_and_acks_remove() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path(), 1 << 20, &["a:x", "a:y", "a:z", "k:2", "r"], "1=x 3=z");
    }

    #[test]
    fn seq_keeps_increasing_across_restarts_even_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path(), 1 << 20, &["a:x", "a:y", "k:1", "k:2", "r", "a:z"], "3=z");
        let mut spool = check(dir.path(), 1 << 20, &["k:3", "r"], "");
        assert_eq!(spool.append(|_| b"w".to_vec()).unwrap(), 4);
    }

    #[test]
    fn half_written_tail_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let spool = check(dir.path(), 1 << 20, &["a:first", "a:second", "t:3", "a:third"], "1=first 2=third");
        assert_eq!(spool.stats().corrupt_records_skipped, 1);
        check(dir.path(), 1 << 20, &["r"], "1=first 2=third");
    }

    #[test]
    fn overflow_drops_oldest_with_a_counter() {
        let dir = tempfile::tempdir().unwrap();
        let record = (HEADER_LEN + 3) as u64;
        let spool = check(dir.path(), 3 * record, &["a:aaa", "a:bbb", "a:ccc", "a:ddd", "a:eee"], "3=ccc 4=ddd 5=eee");
        assert_eq!(spool.stats().dropped_overflow, 2);
        check(dir.path(), 3 * record, &["r"], "3=ccc 4=ddd 5=eee");
    }

    #[test]
    fn acked_segments_are_deleted_and_seq_survives() {
        let dir = tempfile::tempdir().unwrap();
        // 4096-byte segments: 200-byte records make several of them.
        let text = "x".repeat(200);
        let mut spool = Spool::open(settings(dir.path(), 1 << 16)).unwrap();
        for _ in 0..100 {
            spool.append(|_| text.clone().into_bytes()).unwrap();
        }
        for seq in 1..=100 {
            spool.ack(seq).unwrap();
        }
        let n_segments = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("seg-"))
            .count();
        assert_eq!(n_segments, 1, "only the active segment is left");
        drop(spool);
        let mut spool = Spool::open(settings(dir.path(), 1 << 16)).unwrap();
        assert!(spool.pending().unwrap().is_empty());
        assert_eq!(spool.append(|seq| seq.to_string().into_bytes()).unwrap(), 101);
    }

    #[test]
    fn old_records_are_dropped_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(settings(dir.path(), 1 << 20)).unwrap();
        let long_ago = SystemTime::now() - Duration::from_secs(7200);
        spool.append_at(long_ago, |_| b"old".to_vec()).unwrap();
        spool.append(|_| b"new".to_vec()).unwrap();
        assert_eq!(payloads(&mut spool), vec![(2, "new".to_owned())]);
        assert_eq!(spool.stats().dropped_age, 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        /// Acks the live record at this index (modulo the number of live records).
        Ack(usize),
        Reopen,
        /// A crash in the middle of an append: this many bytes of the next record, then reopen.
        TornAppend(usize, usize),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..300).prop_map(Op::Append),
            3 => any::<usize>().prop_map(Op::Ack),
            1 => Just(Op::Reopen),
            1 => (0usize..300, 1usize..400).prop_map(|(len, cut)| Op::TornAppend(len, cut)),
        ]
    }

    fn payload_for(seq: u64, len: usize) -> Vec<u8> {
        let mut bytes = format!("{seq}:").into_bytes();
        bytes.resize(len.max(bytes.len()), b'.');
        bytes
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The spool against a model (seq -> payload): what is pending after any sequence of
        /// appends, acks, restarts and torn appends is exactly what the model says; seqs only
        /// grow; overflow drops the oldest.
        #[test]
        fn spool_matches_a_model(ops in prop::collection::vec(arb_op(), 1..60), max_records in 3u64..40) {
            let dir = tempfile::tempdir().unwrap();
            // Bound in bytes that holds about max_records typical records.
            let max_bytes = max_records * (HEADER_LEN as u64 + 150);
            let mut spool = Spool::open(settings(dir.path(), max_bytes)).unwrap();
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut last_seq = 0u64;
            for op in ops {
                match op {
                    Op::Append(len) => {
                        let mut made = Vec::new();
                        let seq = spool.append(|seq| { made = payload_for(seq, len); made.clone() }).unwrap();
                        prop_assert!(seq > last_seq, "seq {} after {}", seq, last_seq);
                        last_seq = seq;
                        let framed = |p: &Vec<u8>| (HEADER_LEN + p.len()) as u64;
                        let new_len = framed(&made);
                        while !model.is_empty() && model.values().map(framed).sum::<u64>() + new_len > max_bytes {
                            let oldest = *model.keys().next().unwrap();
                            model.remove(&oldest);
                        }
                        model.insert(seq, made);
                    }
                    Op::Ack(idx) => {
                        if !model.is_empty() {
                            let seq = *model.keys().nth(idx % model.len()).unwrap();
                            spool.ack(seq).unwrap();
                            model.remove(&seq);
                        }
                    }
                    Op::Reopen => {
                        drop(spool);
                        spool = Spool::open(settings(dir.path(), max_bytes)).unwrap();
                    }
                    Op::TornAppend(len, cut) => {
                        let active = spool.active.as_ref().map(|a| a.first);
                        drop(spool);
                        if let Some(first) = active {
                            let frame = encode_record(last_seq + 1, 0, &payload_for(last_seq + 1, len));
                            let cut = cut.min(frame.len() - 1);
                            OpenOptions::new().append(true).open(segment_path(dir.path(), first)).unwrap()
                                .write_all(&frame[..cut]).unwrap();
                        }
                        spool = Spool::open(settings(dir.path(), max_bytes)).unwrap();
                    }
                }
                let pending: Vec<(u64, Vec<u8>)> =
                    spool.pending().unwrap().into_iter().map(|r| (r.seq, r.payload)).collect();
                let expected: Vec<(u64, Vec<u8>)> = model.iter().map(|(s, p)| (*s, p.clone())).collect();
                prop_assert_eq!(pending, expected);
            }
        }
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
