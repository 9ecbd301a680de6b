//! The Raft log and vote, durable (`Durability::Immediate`) on every change.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};

use super::{any, blocking, encode, LOG, RAFT_STATE};
use crate::raft_types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// The log store. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }

    fn read_state<T: serde::de::DeserializeOwned>(
        db: &Database,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = db.begin_read().map_err(|e| StorageIOError::read(any(e)))?;
        let table = txn
            .open_table(RAFT_STATE)
            .map_err(|e| StorageIOError::read(any(e)))?;
        match table.get(key).map_err(|e| StorageIOError::read(any(e)))? {
            None => Ok(None),
            Some(v) => Ok(Some(
                postcard::from_bytes(v.value()).map_err(|e| StorageIOError::read(any(e)))?,
            )),
        }
    }

    fn durable_write(
        db: &Database,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        f(&txn)?;
        txn.commit()?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let db = self.db.clone();
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        blocking(move || {
            let txn = db
                .begin_read()
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let table = txn
                .open_table(LOG)
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let mut out = Vec::new();
            let iter = table
                .range::<u64>((start, end))
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            for item in iter {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(any(e)))?;
                let entry: Entry = postcard::from_bytes(v.value())
                    .map_err(|e| StorageIOError::read_logs(any(e)))?;
                out.push(entry);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let last_purged: Option<LogId> = Self::read_state(&db, "last_purged")?;
            let txn = db
                .begin_read()
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let table = txn
                .open_table(LOG)
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let last = table
                .last()
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let last_log_id = match last {
                Some((_, v)) => {
                    let entry: Entry = postcard::from_bytes(v.value())
                        .map_err(|e| StorageIOError::read_logs(any(e)))?;
                    Some(entry.log_id)
                }
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let db = self.db.clone();
        let bytes = encode(vote);
        blocking(move || {
            Self::durable_write(&db, |txn| {
                txn.open_table(RAFT_STATE)?
                    .insert("vote", bytes.as_slice())?;
                Ok(())
            })
            .map_err(|e| StorageIOError::write_vote(any(e)).into())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let db = self.db.clone();
        blocking(move || Self::read_state(&db, "vote")).await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, encode(&e)))
            .collect();
        let db = self.db.clone();
        // One durable commit (one fsync) for the whole batch of entries.
        let result = blocking(move || {
            Self::durable_write(&db, |txn| {
                let mut table = txn.open_table(LOG)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice())?;
                }
                Ok(())
            })
            .map_err(|e| StorageIOError::write_logs(any(e)).into())
        })
        .await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            Self::durable_write(&db, |txn| {
                let mut table = txn.open_table(LOG)?;
                table.retain_in::<u64, _>(log_id.index.., |_, _| false)?;
                Ok(())
            })
            .map_err(|e| StorageIOError::write_logs(any(e)).into())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        let bytes = encode(&Some(log_id));
        blocking(move || {
            Self::durable_write(&db, |txn| {
                txn.open_table(RAFT_STATE)?
                    .insert("last_purged", bytes.as_slice())?;
                let mut table = txn.open_table(LOG)?;
                table.retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
                Ok(())
            })
            .map_err(|e| StorageIOError::write_logs(any(e)).into())
        })
        .await
    }
}
