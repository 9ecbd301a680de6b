//! A random mix of operations for test clients, so every harness drives the store alike.

use std::collections::HashMap;

use rand::Rng;

use crate::model::{Op, Outcome};

/// One client's operation generator over a small key set: 30% get, 10% range over every key,
/// 20% put, 10% delete, 15% compare-and-swap and 15% two-key transactions. Compare-and-swaps
/// and transactions expect what this client last read, so some succeed and some do not.
pub struct OpMix {
    keys: Vec<Vec<u8>>,
    /// `[start, end)` covering every key.
    range: (Vec<u8>, Option<Vec<u8>>),
    /// The value this client last saw per key.
    seen: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl OpMix {
    /// `keys` must be non-empty; `range` should cover all of them.
    pub fn new(keys: Vec<Vec<u8>>, range: (Vec<u8>, Option<Vec<u8>>)) -> Self {
        assert!(!keys.is_empty(), "an operation mix needs keys");
        OpMix {
            keys,
            range,
            seen: HashMap::new(),
        }
    }

    fn key(&self, rng: &mut impl Rng) -> Vec<u8> {
        self.keys[rng.random_range(0..self.keys.len())].clone()
    }

    /// The next operation; `value` must be unique to it (values identify writes).
    pub fn next_op(&mut self, rng: &mut impl Rng, value: Vec<u8>) -> Op {
        let key = self.key(rng);
        let roll = rng.random_range(0..100);
        if roll < 30 {
            Op::Get { key }
        } else if roll < 40 {
            Op::Range {
                start: self.range.0.clone(),
                end: self.range.1.clone(),
            }
        } else if roll < 60 {
            Op::Put { key, value }
        } else if roll < 70 {
            Op::Delete { key }
        } else if roll < 85 {
            let expect = self.seen.get(&key).cloned().flatten();
            Op::Cas {
                key,
                expect,
                new: value,
            }
        } else {
            // Two keys at once, if the first still holds what this client last saw.
            let other = self.key(rng);
            let expect = self.seen.get(&key).cloned().flatten();
            let (success, failure) = if other == key {
                (vec![(key.clone(), Some(value))], vec![])
            } else {
                (
                    vec![
                        (key.clone(), Some(value.clone())),
                        (other.clone(), Some(value)),
                    ],
                    vec![(other, None)],
                )
            };
            Op::Txn {
                compare: vec![(key, expect)],
                success,
                failure,
            }
        }
    }

    /// Remembers what a read returned.
    pub fn observe(&mut self, op: &Op, outcome: &Outcome) {
        match (op, outcome) {
            (Op::Get { key }, Outcome::Get(v)) => {
                self.seen.insert(key.clone(), v.clone());
            }
            (Op::Range { .. }, Outcome::Range(kvs)) => {
                for k in &self.keys {
                    let v = kvs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
                    self.seen.insert(k.clone(), v);
                }
            }
            _ => {}
        }
    }
}
