//! A crashable in-memory disk for one redb database.
//!
//! Writes land in the "page cache" (what reads see) and are queued as unsynced until
//! `sync_data`. A simulated power loss ([`SimDisk::crash`]) rebuilds the file from the synced
//! image plus, depending on [`CrashMode`], none or a random subset of the unsynced writes,
//! possibly torn (only a prefix written). Every backend handed out before a crash is fenced
//! off: the dead process can no longer touch the disk.

use std::sync::{Arc, Mutex};

use rand::Rng;

/// What survives of the unsynced writes when the power goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Nothing that was not synced.
    LoseUnsynced,
    /// Each unsynced write independently: lost, written, or torn (a prefix written).
    TornWrites,
}

#[derive(Clone, Debug)]
enum Unsynced {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct DiskState {
    /// What reads see (the page cache).
    cached: Vec<u8>,
    /// What is on the platter.
    synced: Vec<u8>,
    /// Changes since the last sync, in order.
    unsynced: Vec<Unsynced>,
    /// Bumped by every crash; backends of an older generation fail every call.
    generation: u64,
    syncs: u64,
    /// A lying disk: `sync_data` reports success but persists nothing (negative controls).
    lying: bool,
}

fn apply(file: &mut Vec<u8>, change: &Unsynced) {
    match change {
        Unsynced::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[*offset as usize..end].copy_from_slice(data);
        }
        Unsynced::SetLen(len) => file.resize(*len as usize, 0),
    }
}

/// One simulated disk (one redb file). Clones share the disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<DiskState>>,
}

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage backend for `redb::Builder::create_with_backend`, valid until the next crash.
    pub fn backend(&self) -> SimDiskBackend {
        SimDiskBackend {
            disk: self.clone(),
            generation: self.lock().generation,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loses power: afterwards the file is the synced image plus whatever `mode` lets through
    /// of the unsynced writes, and every existing backend fails.
    pub fn crash(&self, mode: CrashMode, rng: &mut impl Rng) {
        let mut s = self.lock();
        let mut file = s.synced.clone();
        if mode == CrashMode::TornWrites {
            for change in &s.unsynced {
                match rng.random_range(0..3) {
                    0 => {}
                    1 => apply(&mut file, change),
                    _ => match change {
                        Unsynced::Write { offset, data } if !data.is_empty() => {
                            let keep = rng.random_range(0..data.len());
                            apply(
                                &mut file,
                                &Unsynced::Write {
                                    offset: *offset,
                                    data: data[..keep].to_vec(),
                                },
                            );
                        }
                        other => apply(&mut file, other),
                    },
                }
            }
        }
        s.cached = file.clone();
        s.synced = file;
        s.unsynced.clear();
        s.generation += 1;
    }

    /// Makes `sync_data` a lie (it succeeds and persists nothing), as a disk with a volatile
    /// write cache would: "acknowledged before it was durable". For negative controls only.
    pub fn set_lying(&self, lying: bool) {
        self.lock().lying = lying;
    }

    /// How many times the file was synced (to see that durability points happen).
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Bytes written but not yet synced.
    pub fn unsynced_bytes(&self) -> usize {
        self.lock()
            .unsynced
            .iter()
            .map(|c| match c {
                Unsynced::Write { data, .. } => data.len(),
                Unsynced::SetLen(_) => 0,
            })
            .sum()
    }
}

/// The redb view of a [`SimDisk`] for one "process lifetime".
#[derive(Debug)]
pub struct SimDiskBackend {
    disk: SimDisk,
    generation: u64,
}

impl SimDiskBackend {
    fn live(&self) -> Result<std::sync::MutexGuard<'_, DiskState>, std::io::Error> {
        let s = self.disk.lock();
        if s.generation != self.generation {
            return Err(std::io::Error::other(
                "simulated disk: this process crashed",
            ));
        }
        Ok(s)
    }
}

impl redb::StorageBackend for SimDiskBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.live()?.cached.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let s = self.live()?;
        let start = offset as usize;
        let end = start
            .checked_add(out.len())
            .filter(|e| *e <= s.cached.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(&s.cached[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut s = self.live()?;
        let change = Unsynced::SetLen(len);
        apply(&mut s.cached, &change);
        s.unsynced.push(change);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut s = self.live()?;
        s.syncs += 1;
        if s.lying {
            return Ok(());
        }
        let changes = std::mem::take(&mut s.unsynced);
        for c in &changes {
            apply(&mut s.synced, c);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut s = self.live()?;
        let change = Unsynced::Write {
            offset,
            data: data.to_vec(),
        };
        apply(&mut s.cached, &change);
        s.unsynced.push(change);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use redb::{ReadableDatabase, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn open(disk: &SimDisk) -> redb::Database {
        redb::Builder::new()
            .create_with_backend(disk.backend())
            .unwrap()
    }

    fn write(db: &redb::Database, k: u64, durability: redb::Durability) {
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(durability).unwrap();
        txn.open_table(T).unwrap().insert(k, k).unwrap();
        txn.commit().unwrap();
    }

    fn keys(db: &redb::Database) -> Vec<u64> {
        let txn = db.begin_read().unwrap();
        let Ok(t) = txn.open_table(T) else {
            return vec![];
        };
        use redb::ReadableTable;
        t.iter().unwrap().map(|r| r.unwrap().0.value()).collect()
    }

    #[test]
    fn a_crash_keeps_durable_commits_and_drops_the_rest() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for mode in [CrashMode::LoseUnsynced, CrashMode::TornWrites] {
            for round in 0..20 {
                let disk = SimDisk::new();
                let db = open(&disk);
                write(&db, 1, redb::Durability::Immediate);
                write(&db, 2, redb::Durability::None);
                write(&db, 3, redb::Durability::Immediate);
                write(&db, 4, redb::Durability::None);
                disk.crash(mode, &mut rng);
                // The dead process cannot write any more.
                let mut txn = db.begin_write().unwrap();
                txn.set_durability(redb::Durability::Immediate).unwrap();
                let _ = txn.open_table(T).map(|mut t| t.insert(9, 9).map(|_| ()));
                assert!(txn.commit().is_err(), "{mode:?} round {round}");
                drop(db);
                let db = open(&disk);
                let found = keys(&db);
                assert!(
                    found.starts_with(&[1, 2, 3]) && found.len() <= 4,
                    "{mode:?} round {round}: {found:?}"
                );
            }
        }
    }
}
