//! `cargo bench -p aspen-kv`: the write path without a network.
//!
//! Measures (1) one durable and one non-durable redb commit, the blocking pool's round trip,
//! and the state machine's apply by itself (one put per entry; to its end, and to its answer,
//! which comes before the commit), (2) sequential single-command
//! writes through a one-node openraft over the real redb store, and (3) write throughput with
//! concurrent writers at several entry sizes (commands per Raft entry). Compare (3) with
//! `aspen bench put` to see what the network and request handling add.
//!
//! Prints medians (p50) and p99 of repeated runs; no timing is asserted anywhere.

use std::collections::BTreeMap;
use std::time::Instant;

use aspen_kv::api::*;
use aspen_kv::testing::MemRouter;
use aspen_kv::{Member, Raft};
use redb::{Database, Durability, TableDefinition};

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(|a, b| a.total_cmp(b));
    format!(
        "p50 {:.3} ms  p99 {:.3} ms",
        ms[ms.len() / 2],
        ms[ms.len() * 99 / 100]
    )
}

/// The state machine's apply by itself (no log, no Raft): one put per entry, as a lone
/// sequential client produces them, with and without an idempotency session. Includes the
/// trip to the blocking pool the node pays.
async fn apply_alone(dir: &std::path::Path) {
    use aspen_kv::raft_types::{Entry, EntryPayload};
    let (_log, mut sm) = aspen_kv::open(dir).expect("store");
    let mut ms = Vec::new();
    for _ in 0..5000 {
        let t = Instant::now();
        tokio::task::spawn_blocking(|| ()).await.expect("pool");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("blocking pool, empty round trip:           {}", summary(ms));
    let mut index = 0;
    for sessions in [false, true] {
        let (mut ms, mut answered) = (Vec::new(), Vec::new());
        for i in 0..5000u64 {
            index += 1;
            let mut command = put(format!("apply/{:05}", i % 10_000));
            if sessions {
                command.session = Some(Session {
                    client_id: 7,
                    seq: i,
                    acked_below: i,
                });
            }
            let entry = Entry {
                log_id: aspen_kv::raft_types::log_id(1, 1, index),
                payload: EntryPayload::Normal(Batch {
                    proposed_at_ms: 1_000_000 + i,
                    proposal: u128::from(index),
                    commands: vec![command],
                }),
            };
            let answer = sm.watch_proposal(u128::from(index));
            let t = Instant::now();
            let answer = async {
                answer.await.expect("answered");
                t.elapsed()
            };
            let (applied, answer) = tokio::join!(sm.apply_committed(vec![entry]), answer);
            applied.expect("apply");
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            answered.push(answer.as_secs_f64() * 1e3);
        }
        let label = if sessions {
            "with session"
        } else {
            "no session"
        };
        println!("apply alone, 1 put/entry, {label}:    {}", summary(ms));
        println!(
            "  ... until the proposer is answered:     {}",
            summary(answered)
        );
    }
}

fn put(key: String) -> Command {
    Command {
        session: None,
        op: WriteOp::Put {
            key: key.into_bytes(),
            value: vec![0; 256],
            prev_kv: false,
        },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    let db = Database::create(dir.path().join("commit.redb")).expect("db");
    for durability in [Durability::Immediate, Durability::None] {
        let mut ms = Vec::new();
        for i in 0..1000u64 {
            let t = Instant::now();
            let mut txn = db.begin_write().expect("txn");
            txn.set_durability(durability).expect("durability");
            txn.open_table(T)
                .expect("table")
                .insert(i, [0u8; 300].as_slice())
                .expect("insert");
            txn.commit().expect("commit");
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "redb commit ({durability:?}, 300 B):            {}",
            summary(ms)
        );
    }

    apply_alone(&dir.path().join("apply")).await;

    let router = MemRouter::new();
    let (log, sm) = aspen_kv::open(&dir.path().join("node")).expect("store");
    let raft = Raft::new(
        1,
        aspen_kv::raft_config(1_000_000, 1000),
        router.network(1),
        log,
        sm.clone(),
    )
    .await
    .expect("raft");
    router.register(1, raft.clone(), sm);
    raft.initialize(BTreeMap::from([(1, Member::default())]))
        .await
        .expect("init");
    raft.wait(None)
        .current_leader(1, "leader")
        .await
        .expect("leader");

    let mut ms = Vec::new();
    for i in 0..3000u64 {
        let t = Instant::now();
        raft.client_write(Batch {
            proposed_at_ms: 0,
            proposal: 0,
            commands: vec![put(format!("seq/{i}"))],
        })
        .await
        .expect("write");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("sequential write, 1 command/entry:         {}", summary(ms));

    for (writers, per_entry) in [(64usize, 1usize), (8, 8), (4, 16), (2, 32), (2, 128)] {
        let total = 40_000usize;
        let start = Instant::now();
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let raft = raft.clone();
                tokio::spawn(async move {
                    for i in 0..total / writers / per_entry {
                        let commands = (0..per_entry)
                            .map(|j| put(format!("c/{w}/{i}/{j}")))
                            .collect();
                        raft.client_write(Batch {
                            proposed_at_ms: 0,
                            proposal: 0,
                            commands,
                        })
                        .await
                        .expect("write");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer");
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{writers:>3} writers x {per_entry:>3} commands/entry:      {:>8.0} commands/s  {:>6.0} entries/s",
            total as f64 / secs,
            (total / per_entry) as f64 / secs
        );
    }
}
