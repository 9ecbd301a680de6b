//! The Raft log's own files: an append-only stream of checksummed records.
//!
//! Why not redb: a durable redb commit of one small entry rewrites B-tree pages and a header
//! (0.20-0.25 ms on the machines this is built on); appending a record to a preallocated
//! file and `fdatasync` costs about 0.1 ms, and a sequential write pays one per request.
//!
//! # Layout
//!
//! Two files, one active. Each starts with a header (`HEADER_LEN` bytes: magic, epoch,
//! checksum); records follow back to back:
//!
//! ```text
//! len: u32 LE | crc: u32 LE | kind: u8 | payload (len bytes)
//! crc = crc32(epoch LE ‖ kind ‖ payload)
//! ```
//!
//! Kinds: an entry (postcard `Entry`), the vote, "purged up to" (a log id), and "truncated
//! from" (an index: that entry and every later one are gone). Replaying the records in order
//! rebuilds the log's state. The file grows in zero-filled chunks (so a sync rarely has to
//! persist a new length), and a zero `len` ends the stream.
//!
//! # Invariants
//!
//! - **Everything acknowledged is before the first bad record.** Records are written in
//!   order and a sync covers everything before it, so a crash can only damage records that
//!   were never acknowledged, at the end. Opening stops at the first record that is
//!   incomplete or fails its checksum, and zeroes everything after it before anything new
//!   is written, so an unacknowledged record past a torn one can never come back.
//! - **Stale bytes never pass as records.** The checksum covers the file's epoch, and a file
//!   is reused only under a new epoch, so leftovers of its earlier life fail the check.
//! - **The file opened is complete.** Compaction writes the live state (vote, purge point,
//!   live entries) into the inactive file, syncs it, and only then writes and syncs that
//!   file's header with the next epoch. Opening picks the valid header with the highest
//!   epoch; a compaction cut short leaves the old file in charge. Once the new file is in
//!   charge, the old one is emptied.
//! - **A failure stops the log.** After a failed write, sync or compaction what is on disk
//!   is unknown, so every later change is refused until the log is opened again.

use std::collections::BTreeMap;
use std::io;
use std::ops::RangeBounds;
use std::sync::{Arc, RwLock};

use redb::StorageBackend;

use crate::raft_types::{LogId, Vote};

const MAGIC: [u8; 8] = *b"ASPNWAL1";
/// Bytes before the first record: magic, epoch (u64 LE), crc32 of both (u32 LE), zeros.
pub(crate) const HEADER_LEN: u64 = 32;
/// Bytes before a record's payload: length, checksum, kind.
const RECORD_HEADER: usize = 9;
/// Largest record payload. An entry carries at most one system transaction
/// ([`crate::limits::MAX_SYSTEM_TXN_BYTES`]) or one batch, well under this; a larger length
/// read back is damage and ends the stream.
pub(crate) const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;
/// How the files grow and when they are compacted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizes {
    /// The active file grows by this much at a time, zero-filled.
    pub grow_by: u64,
    /// Compaction runs once the active file passes this many bytes, if at most half of it
    /// is live entries.
    pub compact_at: u64,
}

/// What a node uses.
pub(crate) const NODE_SIZES: Sizes = Sizes {
    grow_by: 8 * 1024 * 1024,
    compact_at: 64 * 1024 * 1024,
};

/// What the simulation uses: small, so that compactions meet crashes.
pub(crate) const SIMULATION_SIZES: Sizes = Sizes {
    grow_by: 4 * 1024,
    compact_at: 16 * 1024,
};

const KIND_ENTRY: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_PURGED: u8 = 3;
const KIND_TRUNCATED: u8 = 4;

/// Why the log files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("log file I/O: {0}")]
    Io(#[from] io::Error),
    #[error("log record at offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("a log record of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// After a failed write, sync or compaction what is on disk is unknown (a failed
    /// `fsync` may have dropped dirty pages; a compaction may have made the other file win):
    /// every later change is refused until the log is opened again.
    #[error("the log stopped after an earlier failure: {0}")]
    Stopped(String),
}

/// Where one live entry's bytes are.
#[derive(Clone, Copy, Debug)]
struct Slot {
    log_id: LogId,
    /// Offset of the payload in the active file.
    offset: u64,
    len: u32,
}

/// What readers share with the writer: the live entries, the vote, the purge point.
#[derive(Debug, Default)]
struct State {
    active: usize,
    slots: BTreeMap<u64, Slot>,
    vote: Option<Vote>,
    purged: Option<LogId>,
}

impl State {
    /// Inserts `slot`, dropping its index and every later one (Raft appends are contiguous; a
    /// conflicting suffix is truncated first anyway). Returns the record bytes dropped.
    fn put(&mut self, slot: Slot) -> u64 {
        let dropped = self.drop_from(slot.log_id.index);
        self.slots.insert(slot.log_id.index, slot);
        dropped
    }

    /// Drops the entry at `from` and every later one; returns the record bytes dropped.
    fn drop_from(&mut self, from: u64) -> u64 {
        record_bytes(&self.slots.split_off(&from))
    }

    /// Drops every entry up to `upto`, the new purge point; returns the record bytes dropped.
    fn drop_through(&mut self, upto: LogId) -> u64 {
        let kept = self.slots.split_off(&(upto.index + 1));
        self.purged = Some(upto);
        record_bytes(&std::mem::replace(&mut self.slots, kept))
    }
}

/// The reading side, shared by every clone of the log store.
#[derive(Clone, Debug)]
pub(crate) struct WalReader {
    files: Arc<[Box<dyn StorageBackend>; 2]>,
    state: Arc<RwLock<State>>,
}

impl WalReader {
    pub(crate) fn vote(&self) -> Option<Vote> {
        self.state.read().expect("wal lock").vote
    }

    pub(crate) fn purged(&self) -> Option<LogId> {
        self.state.read().expect("wal lock").purged
    }

    /// The last live entry's id.
    pub(crate) fn last(&self) -> Option<LogId> {
        let s = self.state.read().expect("wal lock");
        s.slots.values().next_back().map(|slot| slot.log_id)
    }

    /// The raw (postcard) bytes of the live entries in `range`, in order.
    pub(crate) fn read_range(
        &self,
        range: impl RangeBounds<u64>,
    ) -> Result<Vec<(LogId, Vec<u8>)>, WalError> {
        // Held while reading: the active file is only rewritten after a compaction made the
        // other one active, which needs the write lock.
        let s = self.state.read().expect("wal lock");
        let file = &self.files[s.active];
        let mut out = Vec::new();
        for slot in s.slots.range(range).map(|(_, slot)| slot) {
            let mut bytes = vec![0; slot.len as usize];
            file.read(slot.offset, &mut bytes)?;
            out.push((slot.log_id, bytes));
        }
        Ok(out)
    }
}

/// The writing side: one owner (the log writer thread), which alone changes the files.
#[derive(Debug)]
pub(crate) struct Wal {
    reader: WalReader,
    epoch: u64,
    /// Where the next record goes in the active file.
    end: u64,
    /// The active file's length (zero from `end` on).
    len: u64,
    /// Bytes of the active file's records that are live entries.
    live: u64,
    /// Records written since the last sync (not yet durable).
    unsynced: bool,
    sizes: Sizes,
    /// The failure that stopped the log (see [`WalError::Stopped`]).
    stopped: Option<String>,
}

fn checksum(epoch: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

fn header(epoch: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The epoch in a file's header, if it has a valid one.
fn read_epoch(file: &dyn StorageBackend) -> Result<Option<u64>, WalError> {
    if file.len()? < HEADER_LEN {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN as usize];
    file.read(0, &mut h)?;
    let crc = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
    if h[..8] != MAGIC || crc32fast::hash(&h[..16]) != crc {
        return Ok(None);
    }
    Ok(Some(u64::from_le_bytes(
        h[8..16].try_into().expect("8 bytes"),
    )))
}

/// Appends one record to `buf`.
fn encode_record(buf: &mut Vec<u8>, epoch: u64, kind: u8, payload: &[u8]) -> Result<(), WalError> {
    if payload.len() > MAX_RECORD_BYTES {
        return Err(WalError::TooLarge {
            len: payload.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&checksum(epoch, kind, payload).to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(offset: u64, bytes: &[u8]) -> Result<T, WalError> {
    postcard::from_bytes(bytes).map_err(|e| WalError::Corrupt {
        offset,
        reason: e.to_string(),
    })
}

impl Wal {
    /// Opens the log in `files` (two, empty for a new log): the newest complete file, its
    /// records replayed up to the first damaged one, everything after that zeroed.
    pub(crate) fn open(files: [Box<dyn StorageBackend>; 2], sizes: Sizes) -> Result<Wal, WalError> {
        let epochs = [read_epoch(&*files[0])?, read_epoch(&*files[1])?];
        let (active, epoch) = match epochs {
            [None, None] => {
                // A new log, or one whose first header write was cut short (no record is
                // written before the header is durable). Anything longer is damage: refuse
                // rather than start empty and forget acknowledged entries and votes.
                for (i, file) in files.iter().enumerate() {
                    if file.len()? > HEADER_LEN {
                        return Err(WalError::Corrupt {
                            offset: 0,
                            reason: format!("log file {i} has records but no valid header"),
                        });
                    }
                }
                (0, 0)
            }
            [Some(a), Some(b)] if b > a => (1, b),
            [Some(a), _] => (0, a),
            [None, Some(b)] => (1, b),
        };
        let file = &*files[active];
        let len = file.len()?;
        let mut state = State {
            active,
            ..State::default()
        };
        let mut live = 0u64;
        let mut end = HEADER_LEN;
        if epoch == 0 {
            // A new log: a header (epoch 1) made durable before any record.
            file.set_len(0)?;
            file.write(0, &header(1))?;
            file.sync_data()?;
            return Ok(Wal::new(
                files,
                state,
                sizes,
                [1, HEADER_LEN, HEADER_LEN, 0],
            ));
        }
        // Replay. The file is read in chunks; a record may straddle two.
        let mut at = HEADER_LEN;
        let mut head = [0u8; RECORD_HEADER];
        loop {
            if at + RECORD_HEADER as u64 > len {
                break;
            }
            file.read(at, &mut head)?;
            let n = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
            let kind = head[8];
            let payload_at = at + RECORD_HEADER as u64;
            if n == 0 && crc == 0 && kind == 0 {
                break; // zero fill: the end
            }
            if n > MAX_RECORD_BYTES || payload_at + n as u64 > len {
                break; // torn or damaged
            }
            let mut payload = vec![0; n];
            file.read(payload_at, &mut payload)?;
            if checksum(epoch, kind, &payload) != crc {
                break;
            }
            match kind {
                KIND_ENTRY => {
                    let entry: crate::raft_types::Entry = decode(at, &payload)?;
                    live -= state.put(Slot {
                        log_id: entry.log_id,
                        offset: payload_at,
                        len: n as u32,
                    });
                    live += (RECORD_HEADER + n) as u64;
                }
                KIND_VOTE => state.vote = Some(decode(at, &payload)?),
                KIND_PURGED => {
                    live -= state.drop_through(decode(at, &payload)?);
                }
                KIND_TRUNCATED => {
                    live -= state.drop_from(decode(at, &payload)?);
                }
                other => {
                    return Err(WalError::Corrupt {
                        offset: at,
                        reason: format!("unknown record kind {other} with a valid checksum"),
                    })
                }
            }
            at = payload_at + n as u64;
            end = at;
        }
        // Nothing after the last good record may survive: zero it (durably) before any new
        // record could land between it and older leftovers.
        if end < len {
            file.set_len(end)?;
            file.set_len(len)?;
            file.sync_data()?;
        }
        Ok(Wal::new(files, state, sizes, [epoch, end, len, live]))
    }

    fn new(
        files: [Box<dyn StorageBackend>; 2],
        state: State,
        sizes: Sizes,
        [epoch, end, len, live]: [u64; 4],
    ) -> Wal {
        Wal {
            reader: WalReader {
                files: Arc::new(files),
                state: Arc::new(RwLock::new(state)),
            },
            epoch,
            end,
            len,
            live,
            unsynced: false,
            sizes,
            stopped: None,
        }
    }

    pub(crate) fn reader(&self) -> WalReader {
        self.reader.clone()
    }

    fn active(&self) -> &dyn StorageBackend {
        let active = self.reader.state.read().expect("wal lock").active;
        &*self.reader.files[active]
    }

    /// Writes `records` (encoded) at the end of the active file, growing it first if needed.
    /// Runs one change of the files; its failure stops the log.
    fn guarded(
        &mut self,
        change: impl FnOnce(&mut Self) -> Result<(), WalError>,
    ) -> Result<(), WalError> {
        if let Some(why) = &self.stopped {
            return Err(WalError::Stopped(why.clone()));
        }
        let r = change(self);
        if let Err(e @ (WalError::Io(_) | WalError::Corrupt { .. })) = &r {
            self.stopped = Some(e.to_string());
        }
        r
    }

    fn write(&mut self, records: &[u8]) -> Result<(), WalError> {
        self.guarded(|wal| wal.write_unguarded(records))
    }

    fn write_unguarded(&mut self, records: &[u8]) -> Result<(), WalError> {
        let need = self.end + records.len() as u64;
        if need > self.len {
            let grow_by = self.sizes.grow_by;
            let len = need.div_ceil(grow_by) * grow_by;
            // Zeros written, not a sparse hole: later syncs then rarely persist metadata.
            let file = self.active();
            let mut at = self.len;
            let zeros = vec![0u8; (len - at).min(grow_by) as usize];
            while at < len {
                let n = (len - at).min(zeros.len() as u64);
                file.write(at, &zeros[..n as usize])?;
                at += n;
            }
            self.len = len;
        }
        self.active().write(self.end, records)?;
        self.end = need;
        self.unsynced = true;
        Ok(())
    }

    /// Writes one record of `kind` (not an entry) at the end of the active file.
    fn write_record(&mut self, kind: u8, payload: &[u8]) -> Result<(), WalError> {
        let mut buf = Vec::new();
        encode_record(&mut buf, self.epoch, kind, payload)?;
        self.write(&buf)
    }

    /// Appends entries (id and postcard bytes); durable at the next [`Self::sync`], readable
    /// at once.
    pub(crate) fn append(&mut self, entries: &[(LogId, &[u8])]) -> Result<(), WalError> {
        let mut buf =
            Vec::with_capacity(entries.iter().map(|(_, b)| RECORD_HEADER + b.len()).sum());
        let mut slots = Vec::with_capacity(entries.len());
        for (log_id, bytes) in entries {
            let offset = self.end + (buf.len() + RECORD_HEADER) as u64;
            encode_record(&mut buf, self.epoch, KIND_ENTRY, bytes)?;
            slots.push(Slot {
                log_id: *log_id,
                offset,
                len: bytes.len() as u32,
            });
        }
        self.write(&buf)?;
        let mut s = self.reader.state.write().expect("wal lock");
        for slot in slots {
            self.live -= s.put(slot);
            self.live += RECORD_HEADER as u64 + u64::from(slot.len);
        }
        Ok(())
    }

    /// Drops the entry at `from` and every later one (durable at the next sync).
    pub(crate) fn truncate(&mut self, from: u64) -> Result<(), WalError> {
        self.write_record(KIND_TRUNCATED, &postcard_bytes(&from))?;
        self.live -= self.reader.state.write().expect("wal lock").drop_from(from);
        Ok(())
    }

    /// Drops every entry up to `upto` and records it as the purge point.
    pub(crate) fn purge(&mut self, upto: LogId) -> Result<(), WalError> {
        self.write_record(KIND_PURGED, &postcard_bytes(&upto))?;
        self.live -= self
            .reader
            .state
            .write()
            .expect("wal lock")
            .drop_through(upto);
        Ok(())
    }

    pub(crate) fn save_vote(&mut self, vote: &Vote) -> Result<(), WalError> {
        self.write_record(KIND_VOTE, &postcard_bytes(vote))?;
        self.reader.state.write().expect("wal lock").vote = Some(*vote);
        Ok(())
    }

    /// Makes everything written so far durable; then compacts if the active file is mostly
    /// dead records.
    pub(crate) fn sync(&mut self) -> Result<(), WalError> {
        self.guarded(|wal| {
            if wal.unsynced {
                wal.active().sync_data()?;
                wal.unsynced = false;
            }
            if wal.end > wal.sizes.compact_at && wal.live * 2 < wal.end {
                wal.compact()?;
            }
            Ok(())
        })
    }

    /// Rewrites the live state into the other file under the next epoch and switches to it
    /// (see the module docs for why a crash at any point leaves a complete log).
    fn compact(&mut self) -> Result<(), WalError> {
        let epoch = self.epoch + 1;
        let (other, vote, purged, entries) = {
            let s = self.reader.state.read().expect("wal lock");
            (1 - s.active, s.vote, s.purged, s.slots.len())
        };
        let mut buf = Vec::new();
        if let Some(vote) = &vote {
            encode_record(&mut buf, epoch, KIND_VOTE, &postcard_bytes(vote))?;
        }
        if let Some(purged) = &purged {
            encode_record(&mut buf, epoch, KIND_PURGED, &postcard_bytes(purged))?;
        }
        let mut slots = BTreeMap::new();
        for (log_id, bytes) in self.reader.read_range(..)? {
            let offset = HEADER_LEN + (buf.len() + RECORD_HEADER) as u64;
            encode_record(&mut buf, epoch, KIND_ENTRY, &bytes)?;
            slots.insert(
                log_id.index,
                Slot {
                    log_id,
                    offset,
                    len: bytes.len() as u32,
                },
            );
        }
        debug_assert_eq!(slots.len(), entries);
        let end = HEADER_LEN + buf.len() as u64;
        let len = end.div_ceil(self.sizes.grow_by).max(1) * self.sizes.grow_by;
        let file = &*self.reader.files[other];
        // The old header first: until the new one is written, this file must not win.
        file.set_len(0)?;
        file.set_len(len)?;
        file.write(HEADER_LEN, &buf)?;
        file.sync_data()?;
        file.write(0, &header(epoch))?;
        file.sync_data()?;
        let live = record_bytes(&slots);
        {
            let mut s = self.reader.state.write().expect("wal lock");
            s.active = other;
            s.slots = slots;
        }
        // The old file lost to the new epoch: its space goes back (unsynced, as whatever
        // survives of it in a crash is still the older epoch).
        self.reader.files[1 - other].set_len(0)?;
        tracing::debug!(
            from_bytes = self.end,
            to_bytes = end,
            entries,
            epoch,
            "log compacted"
        );
        self.epoch = epoch;
        self.end = end;
        self.len = len;
        self.live = live;
        Ok(())
    }
}

/// The record bytes (headers included) of `slots`' entries.
fn record_bytes(slots: &BTreeMap<u64, Slot>) -> u64 {
    slots
        .values()
        .map(|s| RECORD_HEADER as u64 + u64::from(s.len))
        .sum()
}

fn postcard_bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("log state encodes")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::raft_types::Entry;
    use crate::testing::{CrashMode, SimDisk};

    /// What the log should hold: entries (id, bytes), vote, purge point.
    #[derive(Clone, Debug, Default, PartialEq)]
    struct Model {
        entries: BTreeMap<u64, (LogId, Vec<u8>)>,
        vote: Option<Vote>,
        purged: Option<LogId>,
    }

    fn log_id(term: u64, index: u64) -> LogId {
        crate::raft_types::log_id(term, 1, index)
    }

    fn entry_bytes(id: LogId) -> Vec<u8> {
        postcard::to_allocvec(&Entry {
            log_id: id,
            payload: openraft::EntryPayload::Blank,
        })
        .unwrap()
    }

    fn tiny() -> Sizes {
        Sizes {
            grow_by: 512,
            compact_at: 4096,
        }
    }

    fn open(disks: &[SimDisk; 2], sizes: Sizes) -> Wal {
        Wal::open(
            [Box::new(disks[0].backend()), Box::new(disks[1].backend())],
            sizes,
        )
        .unwrap()
    }

    fn observe(wal: &Wal) -> Model {
        let r = wal.reader();
        Model {
            entries: r
                .read_range(..)
                .unwrap()
                .into_iter()
                .map(|(id, bytes)| (id.index, (id, bytes)))
                .collect(),
            vote: r.vote(),
            purged: r.purged(),
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Appends `n` entries of `term` after the last one.
        Append {
            n: u64,
            term: u64,
        },
        /// Truncates from `back` entries before the end.
        Truncate {
            back: u64,
        },
        /// Purges up to `keep` entries before the end.
        Purge {
            keep: u64,
        },
        Vote {
            term: u64,
        },
        Sync,
        Crash {
            torn: bool,
        },
        /// The power goes during the `after`-th write, resize or sync from now (a sync that
        /// may compact, then an append and a sync).
        PowerCut {
            after: u64,
            torn: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u64..6, 1u64..4).prop_map(|(n, term)| Op::Append { n, term }),
            1 => (0u64..4).prop_map(|back| Op::Truncate { back }),
            2 => (0u64..8).prop_map(|keep| Op::Purge { keep }),
            1 => (1u64..9).prop_map(|term| Op::Vote { term }),
            4 => Just(Op::Sync),
            1 => any::<bool>().prop_map(|torn| Op::Crash { torn }),
            1 => (0u64..8, any::<bool>()).prop_map(|(after, torn)| Op::PowerCut { after, torn }),
        ]
    }

    fn last_index(m: &Model) -> u64 {
        m.entries
            .keys()
            .next_back()
            .copied()
            .or(m.purged.map(|p| p.index))
            .unwrap_or(0)
    }

    /// Runs `ops` against the log and the model. After every crash the reopened log must
    /// hold one of the states between the last sync and the crash: all that was synced, and
    /// nothing that was never written.
    fn check(ops: Vec<Op>, sizes: Sizes, seed: u64) -> Result<(), TestCaseError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let disks = [SimDisk::new(), SimDisk::new()];
        let mut wal = open(&disks, sizes);
        let mut model = Model::default();
        // States since the last sync: a crash may leave any of them.
        let mut possible = vec![model.clone()];
        for op in ops {
            match op {
                Op::Append { n, term } => {
                    let start = last_index(&model) + 1;
                    let term = term.max(
                        model
                            .entries
                            .values()
                            .next_back()
                            .map_or(0, |e| e.0.leader_id.term),
                    );
                    let new: Vec<(LogId, Vec<u8>)> = (start..start + n)
                        .map(|i| (log_id(term, i), entry_bytes(log_id(term, i))))
                        .collect();
                    let refs: Vec<(LogId, &[u8])> =
                        new.iter().map(|(id, b)| (*id, b.as_slice())).collect();
                    wal.append(&refs).unwrap();
                    // One write: a crash may keep any prefix of it.
                    for (id, b) in new {
                        model.entries.insert(id.index, (id, b));
                        possible.push(model.clone());
                    }
                }
                Op::Truncate { back } => {
                    let from = last_index(&model).saturating_sub(back).max(1);
                    if model.purged.is_some_and(|p| from <= p.index) {
                        continue;
                    }
                    wal.truncate(from).unwrap();
                    model.entries.split_off(&from);
                }
                Op::Purge { keep } => {
                    let Some((_, (id, _))) = model
                        .entries
                        .iter()
                        .rev()
                        .nth(keep as usize)
                        .map(|(i, e)| (*i, e.clone()))
                    else {
                        continue;
                    };
                    wal.purge(id).unwrap();
                    model.entries = model.entries.split_off(&(id.index + 1));
                    model.purged = Some(id);
                }
                Op::Vote { term } => {
                    let vote = Vote::new(term, 1);
                    wal.save_vote(&vote).unwrap();
                    model.vote = Some(vote);
                }
                Op::Sync => {
                    wal.sync().unwrap();
                    possible.clear();
                }
                Op::PowerCut { .. } | Op::Crash { .. } => {
                    let (torn, cut) = match op {
                        Op::PowerCut { after, torn } => (torn, Some(after)),
                        Op::Crash { torn } => (torn, None),
                        _ => unreachable!(),
                    };
                    let mode = if torn {
                        CrashMode::TornWrites
                    } else {
                        CrashMode::LoseUnsynced
                    };
                    if let Some(after) = cut {
                        for d in &disks {
                            d.arm_power_cut(after, mode, rng.random());
                        }
                        if wal.sync().is_ok() {
                            possible = vec![model.clone()];
                        }
                        let id = log_id(9, last_index(&model) + 1);
                        let bytes = entry_bytes(id);
                        let appended = wal.append(&[(id, &bytes)]);
                        model.entries.insert(id.index, (id, bytes));
                        possible.push(model.clone());
                        if appended.and_then(|()| wal.sync()).is_ok() {
                            possible = vec![model.clone()];
                        }
                        for d in &disks {
                            d.disarm_power_cut();
                        }
                    }
                    drop(wal);
                    for d in &disks {
                        d.crash(mode, &mut rng);
                    }
                    wal = open(&disks, sizes);
                    let found = observe(&wal);
                    possible.push(model.clone());
                    prop_assert!(
                        possible.contains(&found),
                        "after a crash: {found:?}\nnot one of: {possible:?}"
                    );
                    model = found;
                    possible = vec![model.clone()];
                    continue;
                }
            }
            prop_assert_eq!(&observe(&wal), &model);
            possible.push(model.clone());
        }
        // A clean reopen after a final sync holds exactly the model.
        wal.sync().unwrap();
        drop(wal);
        let wal = open(&disks, sizes);
        prop_assert_eq!(&observe(&wal), &model);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn crashes_keep_every_synced_record_and_invent_none(
            ops in proptest::collection::vec(op(), 1..120),
            seed in any::<u64>(),
        ) {
            // Small enough that most runs compact, some of them more than once.
            check(ops, Sizes { grow_by: 64, compact_at: 384 }, seed)?;
        }

        /// Garbage where the log files are is refused or read as a (possibly empty) log,
        /// never a panic.
        #[test]
        fn arbitrary_files_never_panic(
            a in proptest::collection::vec(any::<u8>(), 0..600),
            b in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let disks = [SimDisk::new(), SimDisk::new()];
            for (disk, bytes) in disks.iter().zip([a, b]) {
                let backend = disk.backend();
                backend.set_len(bytes.len() as u64).unwrap();
                backend.write(0, &bytes).unwrap();
            }
            let _ = Wal::open(
                [Box::new(disks[0].backend()), Box::new(disks[1].backend())],
                tiny(),
            );
        }
    }

    #[test]
    fn compaction_moves_the_live_entries_to_the_other_file() {
        let disks = [SimDisk::new(), SimDisk::new()];
        let mut wal = open(&disks, tiny());
        for i in 1..=2000u64 {
            let id = log_id(1, i);
            wal.append(&[(id, &entry_bytes(id))]).unwrap();
            if i % 10 == 0 {
                wal.purge(log_id(1, i - 5)).unwrap();
            }
            wal.sync().unwrap();
        }
        assert!(wal.epoch > 2, "compacted: epoch {}", wal.epoch);
        assert!(
            wal.end < 4096 + 1024,
            "the active file stays small: {}",
            wal.end
        );
        let before = observe(&wal);
        assert_eq!(before.entries.len(), 5);
        assert_eq!(before.purged, Some(log_id(1, 1995)));
        let sizes = [
            disks[0].backend().len().unwrap(),
            disks[1].backend().len().unwrap(),
        ];
        assert!(
            sizes.contains(&0),
            "the file that lost is emptied: {sizes:?}"
        );
        drop(wal);
        assert_eq!(observe(&open(&disks, tiny())), before);
    }

    #[test]
    fn after_a_failed_sync_every_change_is_refused() {
        let disks = [SimDisk::new(), SimDisk::new()];
        let mut wal = open(&disks, tiny());
        let id = log_id(1, 1);
        wal.append(&[(id, &entry_bytes(id))]).unwrap();
        for d in &disks {
            d.arm_power_cut(0, CrashMode::LoseUnsynced, 1);
        }
        assert!(matches!(wal.sync(), Err(WalError::Io(_))));
        for d in &disks {
            d.disarm_power_cut();
        }
        let id = log_id(1, 2);
        let err = wal.append(&[(id, &entry_bytes(id))]).unwrap_err();
        assert!(matches!(err, WalError::Stopped(_)), "{err}");
        assert!(matches!(wal.sync(), Err(WalError::Stopped(_))));
    }

    #[test]
    fn a_header_with_records_but_no_valid_epoch_is_refused_not_emptied() {
        let disks = [SimDisk::new(), SimDisk::new()];
        let mut wal = open(&disks, tiny());
        let id = log_id(1, 1);
        wal.append(&[(id, &entry_bytes(id))]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        disks[0].backend().write(3, &[0xff]).unwrap();
        let err = Wal::open(
            [Box::new(disks[0].backend()), Box::new(disks[1].backend())],
            tiny(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");
    }

    #[test]
    fn the_header_bytes_are_stable() {
        // Golden bytes: a change here makes existing logs unreadable.
        let h = header(7);
        assert_eq!(&h[..8], b"ASPNWAL1");
        assert_eq!(&h[8..16], &7u64.to_le_bytes());
        assert_eq!(
            hex(&h[16..20]),
            hex(&crc32fast::hash(&h[..16]).to_le_bytes())
        );
        let mut rec = Vec::new();
        encode_record(&mut rec, 7, KIND_VOTE, &[1, 2, 3]).unwrap();
        // Over the limit: a typed error, nothing encoded.
        let mut none = Vec::new();
        let err = encode_record(&mut none, 7, KIND_ENTRY, &vec![0; MAX_RECORD_BYTES + 1]);
        assert!(matches!(err, Err(WalError::TooLarge { .. })), "{err:?}");
        assert!(none.is_empty());
        assert_eq!(hex(&rec[..4]), "03000000");
        assert_eq!(rec[8], KIND_VOTE);
        assert_eq!(&rec[9..], &[1, 2, 3]);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
