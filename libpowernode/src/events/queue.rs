//! The durable event queue: `<state>/events/` holds segment files (`seg-<first seq>.log`, records
//! back to back, see [`super::record`]) and `ledger.json`, the highest sequence number the
//! platform has acknowledged plus the count of events dropped by the size cap.
//!
//! Guarantees, and the order of operations that gives them:
//! - **Group commit.** [`Queue::append`] writes a whole batch with one `write` and one
//!   `fdatasync`; a caller may report success for an event only after `append` returned.
//! - **Acknowledged means gone, never before.** [`Queue::ack`] writes the ledger atomically
//!   (fsync'd) *before* deleting any segment it fully covers, so a crash in between leaves a
//!   segment that recovery deletes, never an unacknowledged event without a segment.
//! - **Bounded.** Above `max_bytes`, the oldest segment is dropped whole (acknowledged or not);
//!   the count is added to the ledger first and a `system.events.dropped` event is queued in the
//!   same batch as the event that needed the room.
//! - **Recovery never wedges.** Damaged records (a write cut short by a crash, or bit rot) fail
//!   their CRC and are skipped; a torn tail of the active segment is truncated away; an
//!   unreadable ledger is reset to "nothing acknowledged" (duplicates are harmless, the platform
//!   de-duplicates on the event id; loss is not).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::record::{self, Decoded};
use super::{DROPPED_KIND, Event, Severity};
use crate::fsutil::{atomic_write, ensure_dir, fsync_dir, read_optional};
use crate::{Error, Result};

const LEDGER_FILE: &str = "ledger.json";
const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".log";
/// Queue files hold event payloads, which may name hosts and users: owner only.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// The ledger is a few dozen bytes; anything bigger is not ours.
const MAX_LEDGER_BYTES: u64 = 4096;
/// Who the queue's own events come from.
const SELF_SOURCE: &str = "powernode-fleeteventd";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Disk budget for all segments together.
    pub max_bytes: u64,
    /// A segment is closed once it reaches this size; the cap drops whole segments, so this is
    /// also the granularity of dropping.
    pub segment_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_bytes: 64 * 1024 * 1024,
            segment_bytes: 4 * 1024 * 1024,
        }
    }
}

impl QueueConfig {
    /// Segments are at most a quarter of the cap (dropping one then frees a useful share
    /// without emptying the queue), and at least one record long.
    fn normalized(self) -> QueueConfig {
        let min_seg = (record::HEADER_LEN + record::MAX_BODY) as u64;
        let segment_bytes = self.segment_bytes.min(self.max_bytes / 4).max(min_seg);
        QueueConfig {
            max_bytes: self.max_bytes.max(segment_bytes * 4),
            segment_bytes,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Ledger {
    version: u32,
    acked_seq: u64,
    dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    offset: u64,
    total: u32,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    entries: Vec<Entry>,
}

impl Segment {
    fn last_seq(&self) -> Option<u64> {
        self.entries.last().map(|e| e.seq)
    }
    /// Index of the first entry above `acked`.
    fn first_unacked(&self, acked: u64) -> usize {
        self.entries.partition_point(|e| e.seq <= acked)
    }
}

/// What recovery found, for the start-up log line and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub records: u64,
    pub corrupt_regions: usize,
    pub corrupt_bytes: u64,
    /// Bytes cut off the end of the active segment (a torn last write).
    pub truncated_bytes: u64,
    /// The ledger was unreadable and reset (everything on disk will be sent again).
    pub ledger_reset: bool,
}

/// Events read for upload: `last_seq` is what to acknowledge once they are delivered (it also
/// covers records that could not be decoded any more and were skipped).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub last_seq: u64,
}

#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    cfg: QueueConfig,
    /// Oldest first; the last one is the active segment appends go to.
    segments: VecDeque<Segment>,
    active: File,
    ledger: Ledger,
    next_seq: u64,
    recovery: Recovery,
}

fn segment_name(base: u64) -> String {
    format!("{SEGMENT_PREFIX}{base:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?
        .parse()
        .ok()
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| Error::io("open segment", path, e))
}

impl Queue {
    /// Open (creating) the queue in `dir` and recover whatever a crash left behind.
    pub fn open(dir: &Path, cfg: QueueConfig) -> Result<Queue> {
        let cfg = cfg.normalized();
        ensure_dir(dir, DIR_MODE)?;
        let mut recovery = Recovery::default();
        let ledger_path = dir.join(LEDGER_FILE);
        let ledger = match read_optional(&ledger_path, MAX_LEDGER_BYTES) {
            Ok(None) => Ledger::default(),
            Ok(Some(bytes)) => match serde_json::from_slice::<Ledger>(&bytes) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(path = %ledger_path.display(), error = %e, "event ledger unreadable; resending everything queued");
                    recovery.ledger_reset = true;
                    Ledger::default()
                }
            },
            Err(e) => {
                tracing::warn!(path = %ledger_path.display(), error = %e, "event ledger unreadable; resending everything queued");
                recovery.ledger_reset = true;
                Ledger::default()
            }
        };

        let mut bases = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", dir, e))?;
            if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();

        let mut segments = VecDeque::new();
        let mut last_seq = 0u64;
        for (i, base) in bases.iter().enumerate() {
            let path = dir.join(segment_name(*base));
            let buf = fs::read(&path).map_err(|e| Error::io("read segment", &path, e))?;
            let scan = record::scan(&buf, last_seq);
            recovery.corrupt_regions += scan.corrupt_regions;
            recovery.corrupt_bytes += scan.corrupt_bytes as u64;
            let mut bytes = buf.len() as u64;
            let is_last = i + 1 == bases.len();
            if is_last && scan.valid_end < buf.len() {
                // A torn tail: the last write was cut short. Cut it off so new records follow
                // the last intact one (nothing in it was ever reported as stored).
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io("open segment", &path, e))?;
                f.set_len(scan.valid_end as u64)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| Error::io("truncate torn tail of", &path, e))?;
                recovery.truncated_bytes += bytes - scan.valid_end as u64;
                bytes = scan.valid_end as u64;
            }
            if let Some(r) = scan.records.last() {
                last_seq = r.seq;
            }
            recovery.records += scan.records.len() as u64;
            segments.push_back(Segment {
                path,
                bytes,
                entries: scan
                    .records
                    .iter()
                    .map(|r| Entry {
                        seq: r.seq,
                        offset: r.offset as u64,
                        total: r.total as u32,
                    })
                    .collect(),
            });
        }
        recovery.segments = segments.len();
        if recovery.corrupt_regions > 0 {
            tracing::warn!(
                regions = recovery.corrupt_regions,
                bytes = recovery.corrupt_bytes,
                "damaged event records skipped"
            );
        }

        let next_seq = last_seq.max(ledger.acked_seq) + 1;
        if segments.is_empty() {
            let path = dir.join(segment_name(next_seq));
            segments.push_back(Segment {
                path,
                bytes: 0,
                entries: Vec::new(),
            });
        }
        let active_path = segments.back().map(|s| s.path.clone()).unwrap_or_default();
        let active = open_append(&active_path)?;
        fsync_dir(dir)?;
        let mut q = Queue {
            dir: dir.to_path_buf(),
            cfg,
            segments,
            active,
            ledger,
            next_seq,
            recovery,
        };
        // Segments a crash left behind between the ledger write and their deletion.
        q.delete_acked_segments()?;
        Ok(q)
    }

    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Events stored and not yet acknowledged.
    pub fn queued(&self) -> u64 {
        let acked = self.ledger.acked_seq;
        self.segments
            .iter()
            .map(|s| (s.entries.len() - s.first_unacked(acked)) as u64)
            .sum()
    }

    /// Events dropped by the size cap, ever.
    pub fn dropped(&self) -> u64 {
        self.ledger.dropped
    }

    pub fn acked_seq(&self) -> u64 {
        self.ledger.acked_seq
    }

    /// Bytes on disk in segments.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn write_ledger(&self) -> Result<()> {
        let ledger = Ledger {
            version: 1,
            ..self.ledger
        };
        let bytes = serde_json::to_vec(&ledger)
            .map_err(|e| Error::malformed("event ledger", e.to_string()))?;
        atomic_write(&self.dir.join(LEDGER_FILE), &bytes, FILE_MODE)
    }

    /// Start a new active segment (the old one stays until acknowledged).
    fn roll(&mut self) -> Result<()> {
        if self.segments.back().is_some_and(|s| s.entries.is_empty()) {
            // Nothing in it yet: it already is a fresh segment (and may carry the same name).
            return Ok(());
        }
        let path = self.dir.join(segment_name(self.next_seq));
        let file = open_append(&path)?;
        fsync_dir(&self.dir)?;
        self.segments.push_back(Segment {
            path,
            bytes: 0,
            entries: Vec::new(),
        });
        self.active = file;
        Ok(())
    }

    /// Drop the oldest segment for room; returns how many unacknowledged events went with it.
    /// `None` when there is nothing left that could be dropped.
    fn drop_oldest(&mut self) -> Result<Option<u64>> {
        if self.segments.len() < 2 {
            self.roll()?;
        }
        if self.segments.len() < 2 {
            return Ok(None);
        }
        let Some(oldest) = self.segments.front() else {
            return Ok(None);
        };
        let lost = (oldest.entries.len() - oldest.first_unacked(self.ledger.acked_seq)) as u64;
        if let Some(last) = oldest.last_seq() {
            self.ledger.acked_seq = self.ledger.acked_seq.max(last);
        }
        self.ledger.dropped += lost;
        // The ledger first: after a crash the count survives and the segment is gone or
        // recognised as covered.
        self.write_ledger()?;
        if let Some(seg) = self.segments.pop_front() {
            remove(&seg.path)?;
            fsync_dir(&self.dir)?;
        }
        Ok(Some(lost))
    }

    /// Store `events` durably: one write, one fdatasync. Returns their sequence numbers.
    pub fn append(&mut self, events: &[Event]) -> Result<Vec<u64>> {
        let mut bodies = Vec::with_capacity(events.len() + 1);
        for e in events {
            bodies.push(encode_body(e)?);
        }
        let batch_bytes = |b: &[Vec<u8>]| -> u64 {
            b.iter()
                .map(|x| (x.len() + record::HEADER_LEN) as u64)
                .sum()
        };
        let need = batch_bytes(&bodies);
        let mut lost = 0u64;
        while self.disk_bytes() + need > self.cfg.max_bytes && self.disk_bytes() > 0 {
            match self.drop_oldest()? {
                Some(n) => lost += n,
                None => break,
            }
        }
        if lost > 0 {
            tracing::warn!(
                lost,
                total = self.ledger.dropped,
                "event queue full: oldest events dropped"
            );
            let mut payload = serde_json::Map::new();
            payload.insert("dropped".into(), json!(lost));
            payload.insert("dropped_total".into(), json!(self.ledger.dropped));
            let ev = Event::stamped(DROPPED_KIND, Severity::Warning, payload, SELF_SOURCE);
            bodies.insert(0, encode_body(&ev)?);
        }
        let need = batch_bytes(&bodies);
        let active_bytes = self.segments.back().map_or(0, |s| s.bytes);
        if active_bytes > 0 && active_bytes + need > self.cfg.segment_bytes {
            self.roll()?;
        }

        let mut buf = Vec::with_capacity(need as usize);
        let mut placed = Vec::with_capacity(bodies.len());
        let start = self.segments.back().map_or(0, |s| s.bytes);
        let mut seq = self.next_seq;
        for body in &bodies {
            let offset = start + buf.len() as u64;
            record::encode(seq, body, &mut buf);
            placed.push(Entry {
                seq,
                offset,
                total: (record::HEADER_LEN + body.len()) as u32,
            });
            seq += 1;
        }
        let path = self
            .segments
            .back()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        let written = self
            .active
            .write_all(&buf)
            .and_then(|()| self.active.sync_data());
        if let Err(e) = written {
            // Leave no half record behind for the next append to follow.
            if let Err(t) = self.active.set_len(start) {
                tracing::error!(path = %path.display(), error = %t, "could not cut a failed append back");
            }
            return Err(Error::io("append to", path, e));
        }
        self.next_seq = seq;
        let mut seqs: Vec<u64> = placed.iter().map(|e| e.seq).collect();
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes += buf.len() as u64;
            seg.entries.extend(placed);
        }
        if lost > 0 {
            seqs.remove(0);
        }
        Ok(seqs)
    }

    /// Up to `max` unacknowledged events, oldest first.
    pub fn read_batch(&self, max: usize) -> Result<Batch> {
        let mut batch = Batch {
            events: Vec::new(),
            last_seq: self.ledger.acked_seq,
        };
        let mut taken = 0usize;
        for seg in &self.segments {
            if taken >= max {
                break;
            }
            let from = seg.first_unacked(self.ledger.acked_seq);
            if from == seg.entries.len() {
                continue;
            }
            let file = File::open(&seg.path).map_err(|e| Error::io("open", &seg.path, e))?;
            for entry in &seg.entries[from..] {
                if taken >= max {
                    break;
                }
                taken += 1;
                batch.last_seq = entry.seq;
                let mut buf = vec![0u8; entry.total as usize];
                file.read_exact_at(&mut buf, entry.offset)
                    .map_err(|e| Error::io("read", &seg.path, e))?;
                let event = match record::decode(&buf) {
                    Decoded::Record { seq, body, .. } if seq == entry.seq => {
                        serde_json::from_slice::<Event>(body).map_err(|e| e.to_string())
                    }
                    other => Err(format!("{other:?}")),
                };
                match event {
                    Ok(e) => batch.events.push(e),
                    Err(why) => {
                        tracing::error!(seq = entry.seq, path = %seg.path.display(), reason = %why, "stored event unreadable; skipped");
                    }
                }
            }
        }
        Ok(batch)
    }

    /// The platform has everything up to `seq`: record it, then delete what it covers.
    pub fn ack(&mut self, seq: u64) -> Result<()> {
        if seq <= self.ledger.acked_seq {
            return Ok(());
        }
        self.ledger.acked_seq = seq;
        self.write_ledger()?;
        self.delete_acked_segments()
    }

    fn delete_acked_segments(&mut self) -> Result<()> {
        let acked = self.ledger.acked_seq;
        let mut deleted = false;
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.last_seq().is_none_or(|l| l <= acked))
        {
            if let Some(seg) = self.segments.pop_front() {
                remove(&seg.path)?;
                deleted = true;
            }
        }
        // A drained active segment is replaced by a fresh one, so a drained queue holds no
        // event bytes at all.
        if self.segments.len() == 1
            && self
                .segments
                .back()
                .is_some_and(|s| s.last_seq().is_some_and(|l| l <= acked))
        {
            self.roll()?;
            if let Some(old) = self.segments.pop_front() {
                remove(&old.path)?;
                deleted = true;
            }
        }
        if deleted {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn encode_body(e: &Event) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(e).map_err(|x| Error::malformed("event", x.to_string()))?;
    if body.len() > record::MAX_BODY {
        return Err(Error::TooLarge {
            what: "stored event",
            limit: record::MAX_BODY as u64,
        });
    }
    Ok(body)
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove segment", path, e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ev(i: usize) -> Event {
        Event::new("test.event", "info", &format!(r#"{{"i":{i}}}"#), "test").unwrap()
    }

    fn small() -> QueueConfig {
        // The minimum segment (one maximal record) and a cap of four segments.
        QueueConfig {
            max_bytes: 0,
            segment_bytes: 0,
        }
    }

    fn ids(b: &Batch) -> Vec<i64> {
        b.events
            .iter()
            .map(|e| e.payload.get("i").and_then(|v| v.as_i64()).unwrap_or(-1))
            .collect()
    }

    #[test]
    fn append_read_ack_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), QueueConfig::default()).unwrap();
        let seqs = q.append(&(0..10).map(ev).collect::<Vec<_>>()).unwrap();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        assert_eq!(q.queued(), 10);
        let b = q.read_batch(4).unwrap();
        assert_eq!(ids(&b), [0, 1, 2, 3]);
        q.ack(b.last_seq).unwrap();
        drop(q);
        let mut q = Queue::open(d.path(), QueueConfig::default()).unwrap();
        assert_eq!(q.queued(), 6);
        let b = q.read_batch(100).unwrap();
        assert_eq!(ids(&b), [4, 5, 6, 7, 8, 9]);
        q.ack(b.last_seq).unwrap();
        assert_eq!(q.queued(), 0);
        assert_eq!(q.disk_bytes(), 0, "a drained queue keeps no event bytes");
        // Sequence numbers continue after a drained restart.
        drop(q);
        let mut q = Queue::open(d.path(), QueueConfig::default()).unwrap();
        assert_eq!(q.append(&[ev(10)]).unwrap(), [11]);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), QueueConfig::default()).unwrap();
        q.append(&[ev(0), ev(1)]).unwrap();
        let seg = q.segments.back().unwrap().path.clone();
        drop(q);
        // Half of a third record, as a crash mid-write leaves it.
        let mut third = Vec::new();
        record::encode(3, &serde_json::to_vec(&ev(2)).unwrap(), &mut third);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&third[..third.len() / 2]).unwrap();
        drop(f);
        let mut q = Queue::open(d.path(), QueueConfig::default()).unwrap();
        assert_eq!(q.recovery().truncated_bytes, (third.len() / 2) as u64);
        assert_eq!(q.queued(), 2);
        q.append(&[ev(3)]).unwrap();
        drop(q);
        let q = Queue::open(d.path(), QueueConfig::default()).unwrap();
        assert_eq!(q.recovery().corrupt_regions, 0, "the torn bytes are gone");
        assert_eq!(ids(&q.read_batch(10).unwrap()), [0, 1, 3]);
    }

    #[test]
    fn corrupt_middle_record_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), QueueConfig::default()).unwrap();
        q.append(&(0..5).map(ev).collect::<Vec<_>>()).unwrap();
        let seg = q.segments.back().unwrap();
        let (path, e) = (seg.path.clone(), seg.entries[2]);
        drop(q);
        let mut bytes = fs::read(&path).unwrap();
        bytes[(e.offset + record::HEADER_LEN as u64 + 3) as usize] ^= 0x55;
        fs::write(&path, &bytes).unwrap();
        let q = Queue::open(d.path(), QueueConfig::default()).unwrap();
        assert_eq!(q.recovery().corrupt_regions, 1);
        assert_eq!(ids(&q.read_batch(10).unwrap()), [0, 1, 3, 4]);
    }

    #[test]
    fn cap_drops_oldest_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), small()).unwrap();
        let cfg = q.cfg;
        // ~16 KiB events: a few per segment, the cap reached after a few dozen.
        let big = |i: usize| {
            Event::new(
                "test.big",
                "info",
                &format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(15_000)),
                "t",
            )
            .unwrap()
        };
        for i in 0..200 {
            q.append(&[big(i)]).unwrap();
            assert!(q.disk_bytes() <= cfg.max_bytes, "{} > cap", q.disk_bytes());
        }
        let dropped = q.dropped();
        assert!(dropped > 0);
        let b = q.read_batch(1000).unwrap();
        let kinds: Vec<&str> = b.events.iter().map(|e| e.kind.as_str()).collect();
        assert!(kinds.contains(&DROPPED_KIND), "{kinds:?}");
        let survivors = b.events.iter().filter(|e| e.kind == "test.big").count() as u64;
        let notices: u64 = b
            .events
            .iter()
            .filter(|e| e.kind == DROPPED_KIND)
            .map(|e| e.payload["dropped"].as_u64().unwrap())
            .sum();
        // Every event is either still queued or counted as dropped (notices can be dropped
        // too, so the count may exceed the lost test events, never fall short of them).
        assert!(survivors + dropped >= 200, "{survivors} + {dropped}");
        assert!(notices >= 1);
        // The newest survive, in order.
        let last: Vec<i64> = ids(&b).into_iter().filter(|i| *i >= 0).collect();
        assert_eq!(*last.last().unwrap(), 199);
        assert!(last.windows(2).all(|w| w[0] < w[1]));
        drop(q);
        let q = Queue::open(d.path(), small()).unwrap();
        assert_eq!(q.dropped(), dropped, "the drop count survives a restart");
    }

    #[test]
    fn ledger_recovery() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), small()).unwrap();
        let big = |i: usize| {
            Event::new(
                "t",
                "info",
                &format!(r#"{{"i":{i},"p":"{}"}}"#, "y".repeat(12_000)),
                "t",
            )
            .unwrap()
        };
        for i in 0..20 {
            q.append(&[big(i)]).unwrap();
        }
        assert!(q.segment_count() > 2);
        let b = q.read_batch(12).unwrap();
        let first_seg = q.segments.front().unwrap().path.clone();
        // Crash after the ledger write, before the deletion: write the ledger only.
        q.ledger.acked_seq = b.last_seq;
        q.write_ledger().unwrap();
        drop(q);
        assert!(first_seg.exists());
        let q = Queue::open(d.path(), small()).unwrap();
        assert!(!first_seg.exists(), "covered segment deleted on recovery");
        assert_eq!(
            ids(&q.read_batch(100).unwrap()),
            (12..20).collect::<Vec<_>>()
        );
        drop(q);
        // A garbage ledger resets to "send everything again", never a crash.
        fs::write(d.path().join(LEDGER_FILE), b"\0\0garbage").unwrap();
        let q = Queue::open(d.path(), small()).unwrap();
        assert!(q.recovery().ledger_reset);
        let again = ids(&q.read_batch(100).unwrap());
        assert!(again.ends_with(&(12..20).collect::<Vec<_>>()), "{again:?}");
    }
}
