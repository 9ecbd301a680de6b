use aspen_kv::api::*;
use aspen_kv::testing::MemRouter;
use aspen_kv::{Member, Raft};
use redb::{Database, Durability, TableDefinition};
use std::time::Instant;

fn pct(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "p50 {:.3} ms p99 {:.3} ms",
        v[v.len() / 2],
        v[v.len() * 99 / 100]
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("x.redb")).unwrap();
    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    for d in [Durability::Immediate, Durability::None] {
        let mut ts = vec![];
        for i in 0..500u64 {
            let t = Instant::now();
            let mut txn = db.begin_write().unwrap();
            txn.set_durability(d).unwrap();
            txn.open_table(T)
                .unwrap()
                .insert(i, [0u8; 300].as_slice())
                .unwrap();
            txn.commit().unwrap();
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!("redb commit {d:?}: {}", pct(ts));
    }
    let router = MemRouter::new();
    let (log, sm) = aspen_kv::open(&dir.path().join("n1")).unwrap();
    let raft = Raft::new(
        1,
        aspen_kv::raft_config(100_000, 1000),
        router.network(1),
        log,
        sm,
    )
    .await
    .unwrap();
    router.register(1, raft.clone());
    raft.initialize(std::collections::BTreeMap::from([(1, Member::default())]))
        .await
        .unwrap();
    raft.wait(None).current_leader(1, "l").await.unwrap();
    let mut ts = vec![];
    for i in 0..2000u64 {
        let op = WriteOp::Put {
            key: format!("k{i}").into_bytes(),
            value: vec![0; 256],
            prev_kv: false,
        };
        let t = Instant::now();
        raft.client_write(Batch {
            proposed_at_ms: 0,
            commands: vec![Command { session: None, op }],
        })
        .await
        .unwrap();
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("raft client_write (1 node, in-process): {}", pct(ts));
    for (tasks, per_batch) in [(64usize, 1usize), (2, 32), (4, 16), (8, 8)] {
        let t = Instant::now();
        let total = 20_000usize;
        let mut hs = vec![];
        for w in 0..tasks {
            let raft = raft.clone();
            hs.push(tokio::spawn(async move {
                for i in 0..(total / tasks / per_batch) {
                    let commands = (0..per_batch)
                        .map(|j| Command {
                            session: None,
                            op: WriteOp::Put {
                                key: format!("t{w}-{i}-{j}").into_bytes(),
                                value: vec![0; 256],
                                prev_kv: false,
                            },
                        })
                        .collect();
                    raft.client_write(Batch {
                        proposed_at_ms: 0,
                        commands,
                    })
                    .await
                    .unwrap();
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        println!(
            "{tasks} concurrent writers x {per_batch} cmds/entry: {:.0} cmds/s",
            total as f64 / t.elapsed().as_secs_f64()
        );
    }
}
