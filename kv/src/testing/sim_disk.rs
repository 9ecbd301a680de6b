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
    /// A lying disk (negative controls): `sync_data` persists only what the *previous* sync
    /// was asked to, so the latest acknowledged sync is still volatile.
    lying: bool,
    /// On a lying disk: changes acknowledged as synced but not yet persisted.
    volatile: Vec<Unsynced>,
    /// An armed power cut: after this many more writes/syncs, the power goes mid-operation.
    power_cut: Option<PowerCut>,
    /// Power cuts that have happened (armed ones that fired).
    power_cuts: u64,
}

#[derive(Debug)]
struct PowerCut {
    after_ops: u64,
    mode: CrashMode,
    rng: rand::rngs::StdRng,
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
        crash_locked(&mut self.lock(), mode, rng);
    }

    /// Arms a power cut in the middle of whatever the database does next: the `after_ops`-th
    /// write, resize or sync from now fails and the disk crashes (as [`SimDisk::crash`]) at
    /// that point, so a commit can be interrupted halfway. `seed` drives what survives.
    pub fn arm_power_cut(&self, after_ops: u64, mode: CrashMode, seed: u64) {
        use rand::SeedableRng;
        self.lock().power_cut = Some(PowerCut {
            after_ops,
            mode,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        });
    }

    /// Disarms a power cut that has not fired; returns whether one was armed.
    pub fn disarm_power_cut(&self) -> bool {
        self.lock().power_cut.take().is_some()
    }

    /// How many armed power cuts have fired.
    pub fn power_cuts(&self) -> u64 {
        self.lock().power_cuts
    }
}

fn crash_locked(s: &mut DiskState, mode: CrashMode, rng: &mut impl Rng) {
    let mut file = s.synced.clone();
    let mut lost = std::mem::take(&mut s.volatile);
    lost.append(&mut s.unsynced);
    if mode == CrashMode::TornWrites {
        for change in &lost {
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

impl SimDisk {
    /// Makes `sync_data` a lie, as a disk with a volatile write cache would: it succeeds at
    /// once but persists only what the previous sync covered, so a crash loses the latest
    /// acknowledged writes ("acknowledged before durable"). For negative controls only.
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

    /// [`Self::live`] for an operation that changes the disk: an armed power cut may fire.
    fn live_mut(&self) -> Result<std::sync::MutexGuard<'_, DiskState>, std::io::Error> {
        let mut s = self.live()?;
        let fire = match s.power_cut.as_mut() {
            Some(cut) if cut.after_ops == 0 => true,
            Some(cut) => {
                cut.after_ops -= 1;
                false
            }
            None => false,
        };
        if fire {
            let mut cut = s.power_cut.take().expect("armed");
            crash_locked(&mut s, cut.mode, &mut cut.rng);
            s.power_cuts += 1;
            return Err(std::io::Error::other("simulated disk: power cut"));
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
        let mut s = self.live_mut()?;
        let change = Unsynced::SetLen(len);
        apply(&mut s.cached, &change);
        s.unsynced.push(change);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut s = self.live_mut()?;
        s.syncs += 1;
        let durable_now = if s.lying {
            let acked = std::mem::take(&mut s.unsynced);
            std::mem::replace(&mut s.volatile, acked)
        } else {
            std::mem::take(&mut s.unsynced)
        };
        for c in &durable_now {
            apply(&mut s.synced, c);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut s = self.live_mut()?;
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

    #[test]
    fn a_power_cut_inside_a_commit_keeps_every_completed_durable_commit() {
        for mode in [CrashMode::LoseUnsynced, CrashMode::TornWrites] {
            for after in 0..40 {
                let disk = SimDisk::new();
                let db = open(&disk);
                disk.arm_power_cut(after, mode, after);
                let mut done = Vec::new();
                for k in 1..=20 {
                    let mut txn = db.begin_write().unwrap();
                    txn.set_durability(redb::Durability::Immediate).unwrap();
                    let inserted = match txn.open_table(T) {
                        Ok(mut t) => t.insert(k, k).is_ok(),
                        Err(_) => false,
                    };
                    let ok = inserted && txn.commit().is_ok();
                    if !ok {
                        break;
                    }
                    done.push(k);
                }
                drop(db);
                let fired = disk.power_cuts() == 1;
                let db = open(&disk);
                let found = keys(&db);
                // Every acknowledged commit survives; the interrupted one may or may not.
                assert!(
                    found.starts_with(&done) && found.len() <= done.len() + 1,
                    "{mode:?} cut after {after} ops (fired: {fired}): committed {done:?}, found {found:?}"
                );
            }
        }
    }
}
