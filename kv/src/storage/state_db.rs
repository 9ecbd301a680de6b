//! The state machine's redb database, and the rule that lets an apply answer before its commit.
//!
//! A redb commit costs tens of microseconds, and every `SM_DURABLE_EVERY`-th apply commits
//! durably (an `fsync`, about a millisecond). None of that is needed before the apply answers
//! its proposers: the entries are committed in the Raft log already, and applies commit with
//! `Durability::None`, so a crash loses an apply's commit whether or not it was answered, and
//! the entries are applied again from the log. What must hold is that nobody who heard the
//! answer reads the store without the write. So the apply answers (and publishes what it
//! changed) under [`StateDb::answer_then_commit`], which holds this type's lock from before the
//! first answer until the commit has returned, and every read transaction begins under the
//! same lock. To a reader, an apply takes effect when it takes the lock.
//!
//! Lock order: the key index's lock (`key_index`), then this one. Readers that hold the
//! index's read lock begin their transaction here; an apply that must change the index after
//! its commit takes the index's write lock before this one.

use std::sync::{PoisonError, RwLock};

use redb::{
    CommitError, Database, ReadTransaction, ReadableDatabase, TransactionError, WriteTransaction,
};

/// See the module docs.
pub(crate) struct StateDb {
    db: Database,
    /// Held for writing from an apply's first answer until its commit returned.
    answering: RwLock<()>,
}

impl StateDb {
    pub(crate) fn new(db: Database) -> Self {
        StateDb {
            db,
            answering: RwLock::new(()),
        }
    }

    /// A read transaction that sees every apply answered so far (blocks while an answered
    /// apply commits; call it off the executor, like every redb call).
    pub(crate) fn begin_read(&self) -> Result<ReadTransaction, TransactionError> {
        let _answered = self
            .answering
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        self.db.begin_read()
    }

    /// The database itself, for tests that prepare a store as opening it would.
    #[cfg(test)]
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    pub(crate) fn begin_write(&self) -> Result<WriteTransaction, TransactionError> {
        self.db.begin_write()
    }

    /// Runs `answer`, then commits `txn`; no read transaction begins from before `answer`
    /// runs until the commit has returned. If the commit fails, the answers stand: the
    /// entries stay committed in the log and are applied again (to the same results) when
    /// the node restarts.
    pub(crate) fn answer_then_commit(
        &self,
        txn: WriteTransaction,
        answer: impl FnOnce(),
    ) -> Result<(), CommitError> {
        let _readers_wait = self
            .answering
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        answer();
        txn.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::TableDefinition;
    use std::sync::mpsc;
    use std::sync::Arc;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    /// A reader that starts while an answered apply has not committed yet sees its write.
    #[test]
    fn a_read_begun_after_the_answer_sees_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::new(
            Database::create(dir.path().join("s.redb")).unwrap(),
        ));
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap().insert(1, 1).unwrap();
        let (answered, heard) = mpsc::channel();
        let (read, got) = mpsc::channel();
        let reader = {
            let db = db.clone();
            std::thread::spawn(move || {
                heard.recv().unwrap();
                let txn = db.begin_read().unwrap();
                let value = txn
                    .open_table(T)
                    .unwrap()
                    .get(1)
                    .unwrap()
                    .map(|v| v.value());
                read.send(value).unwrap();
            })
        };
        db.answer_then_commit(txn, || {
            answered.send(()).unwrap();
            // The reader is blocked until this returns: it has not read yet.
            assert!(got
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_err());
        })
        .unwrap();
        reader.join().unwrap();
        assert_eq!(got.recv().unwrap(), Some(1));
    }
}
