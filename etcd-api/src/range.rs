//! etcd's range reads on the store.
//!
//! The store reads keys in key order, a page at a time. etcd's range adds sorting, filters on
//! create and mod revisions, a count of every key in the range, keys-only and count-only
//! answers. [`RangePlan`] says what the store must read for a request, and
//! [`RangePlan::finish`] turns what was read into etcd's answer, in the order etcd applies
//! its steps: filter, sort, limit, strip values.

use aspen_kv::api::{Key, KeyValue};

use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::RangeRequest;
use crate::pb::mvccpb;
use crate::revision::{key_rev_to_etcd, read_at, ReadAt};
use crate::EtcdError;

/// The field a range is sorted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// What one etcd range request asks of the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePlan {
    /// The store's form of the key range: `end` `None` is the key `start` alone, empty is
    /// every key from `start` on.
    pub start: Key,
    pub end: Option<Key>,
    pub at: ReadAt,
    /// Most keys answered (0: all).
    pub limit: u64,
    /// The sort etcd applies, if any, and whether descending. etcd sorts ascending when a
    /// target other than the key is named without an order, and never re-sorts keys
    /// ascending (the natural order).
    pub sort: Option<(SortBy, bool)>,
    /// Filters, in etcd's numbers (0: none).
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
    pub keys_only: bool,
    pub count_only: bool,
    pub serializable: bool,
}

/// etcd's answer to a range, without its header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeAnswer {
    pub kvs: Vec<mvccpb::KeyValue>,
    pub more: bool,
    pub count: i64,
}

/// The store's key range for etcd's `key` and `range_end`: an empty `range_end` is the key
/// alone, `"\0"` is every key from `key` on.
pub fn key_range(key: &[u8], range_end: &[u8]) -> (Key, Option<Key>) {
    let end = match range_end {
        [] => None,
        [0] => Some(Vec::new()),
        e => Some(e.to_vec()),
    };
    (key.to_vec(), end)
}

impl RangePlan {
    pub fn new(req: &RangeRequest) -> Result<RangePlan, EtcdError> {
        if req.key.is_empty() {
            return Err(EtcdError::EmptyKey);
        }
        let order = SortOrder::try_from(req.sort_order)
            .map_err(|_| EtcdError::InvalidArgument("invalid sort option".into()))?;
        let target = SortTarget::try_from(req.sort_target)
            .map_err(|_| EtcdError::InvalidArgument("invalid sort option".into()))?;
        let by = match target {
            SortTarget::Key => SortBy::Key,
            SortTarget::Version => SortBy::Version,
            SortTarget::Create => SortBy::Create,
            SortTarget::Mod => SortBy::Mod,
            SortTarget::Value => SortBy::Value,
        };
        let sort = match (by, order) {
            (SortBy::Key, SortOrder::None | SortOrder::Ascend) => None,
            (_, SortOrder::None | SortOrder::Ascend) => Some((by, false)),
            (_, SortOrder::Descend) => Some((by, true)),
        };
        let (start, end) = key_range(&req.key, &req.range_end);
        Ok(RangePlan {
            start,
            end,
            at: read_at(req.revision),
            limit: req.limit.max(0) as u64,
            sort,
            min_mod_revision: req.min_mod_revision,
            max_mod_revision: req.max_mod_revision,
            min_create_revision: req.min_create_revision,
            max_create_revision: req.max_create_revision,
            keys_only: req.keys_only,
            count_only: req.count_only,
            serializable: req.serializable,
        })
    }

    fn filters(&self) -> bool {
        self.min_mod_revision != 0
            || self.max_mod_revision != 0
            || self.min_create_revision != 0
            || self.max_create_revision != 0
    }

    /// How many keys, from the start of the range in key order, the store must read: `None`
    /// for all of them (a sort or a filter looks at every key; so does a read without a
    /// limit). One more than the limit tells whether there is more.
    pub fn keys_to_read(&self) -> Option<u64> {
        if self.count_only || self.sort.is_some() || self.filters() || self.limit == 0 {
            return None;
        }
        Some(self.limit.saturating_add(1))
    }

    /// etcd's answer, from the keys read (in key order, as many as [`Self::keys_to_read`]
    /// asked for, or all) and the number of keys in the whole range (`count`, before any
    /// filter, as etcd counts).
    pub fn finish(&self, read: Vec<KeyValue>, count: u64) -> RangeAnswer {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        if self.count_only {
            return RangeAnswer {
                kvs: Vec::new(),
                more: false,
                count,
            };
        }
        let mut kvs: Vec<mvccpb::KeyValue> = read.into_iter().map(to_pb).collect();
        let keep = |v: i64, min: i64, max: i64| (min == 0 || v >= min) && (max == 0 || v <= max);
        kvs.retain(|kv| {
            keep(
                kv.mod_revision,
                self.min_mod_revision,
                self.max_mod_revision,
            ) && keep(
                kv.create_revision,
                self.min_create_revision,
                self.max_create_revision,
            )
        });
        if let Some((by, descending)) = self.sort {
            // Stable: equal targets stay in key order.
            kvs.sort_by(|a, b| {
                let o = match by {
                    SortBy::Key => a.key.cmp(&b.key),
                    SortBy::Version => a.version.cmp(&b.version),
                    SortBy::Create => a.create_revision.cmp(&b.create_revision),
                    SortBy::Mod => a.mod_revision.cmp(&b.mod_revision),
                    SortBy::Value => a.value.cmp(&b.value),
                };
                if descending {
                    o.reverse()
                } else {
                    o
                }
            });
        }
        let mut more = false;
        if self.limit > 0 && kvs.len() as u64 > self.limit {
            kvs.truncate(self.limit as usize);
            more = true;
        }
        if self.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        RangeAnswer { kvs, more, count }
    }
}

/// A stored key-value as etcd shows it.
pub fn to_pb(kv: KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: key_rev_to_etcd(kv.create_revision),
        mod_revision: key_rev_to_etcd(kv.mod_revision),
        version: i64::try_from(kv.version).unwrap_or(i64::MAX),
        value: kv.value,
        lease: i64::try_from(kv.lease).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kv(key: &str, create: u64, modr: u64, version: u64, value: &str) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision: create,
            mod_revision: modr,
            version,
            lease: 0,
        }
    }

    fn keys(a: &RangeAnswer) -> Vec<String> {
        a.kvs
            .iter()
            .map(|k| String::from_utf8(k.key.clone()).unwrap())
            .collect()
    }

    #[test]
    fn range_ends_mean_what_they_mean_in_etcd() {
        assert_eq!(key_range(b"a", b""), (b"a".to_vec(), None));
        assert_eq!(key_range(b"a", b"\0"), (b"a".to_vec(), Some(vec![])));
        assert_eq!(key_range(b"a", b"b"), (b"a".to_vec(), Some(b"b".to_vec())));
        let empty = RangeRequest::default();
        assert_eq!(RangePlan::new(&empty), Err(EtcdError::EmptyKey));
        let bad = RangeRequest {
            key: b"a".to_vec(),
            sort_order: 7,
            ..Default::default()
        };
        assert!(matches!(
            RangePlan::new(&bad),
            Err(EtcdError::InvalidArgument(_))
        ));
    }

    #[test]
    fn sort_filter_limit_as_etcd_orders_them() {
        let read = vec![
            kv("a", 5, 9, 3, "z"),
            kv("b", 2, 2, 1, "y"),
            kv("c", 7, 7, 1, "x"),
            kv("d", 3, 8, 2, "w"),
        ];
        // Sorted by create revision, descending, first two.
        let plan = RangePlan::new(&RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            limit: 2,
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Create as i32,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(plan.keys_to_read(), None, "a sort reads the whole range");
        let a = plan.finish(read.clone(), 4);
        assert_eq!(keys(&a), ["c", "a"]);
        assert!(a.more);
        assert_eq!(a.count, 4);
        // A target without an order sorts ascending; ties keep key order.
        let plan = RangePlan::new(&RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            sort_target: SortTarget::Version as i32,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(keys(&plan.finish(read.clone(), 4)), ["b", "c", "d", "a"]);
        // Filters (etcd numbers: the store's plus one) apply before the limit; the count
        // does not see them.
        let plan = RangePlan::new(&RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            min_mod_revision: 8,
            limit: 1,
            keys_only: true,
            ..Default::default()
        })
        .unwrap();
        let a = plan.finish(read, 4);
        assert_eq!(
            keys(&a),
            ["a"],
            "a, c and d pass the filter; b (mod 3) does not"
        );
        assert!(a.kvs[0].value.is_empty());
        assert_eq!(a.kvs[0].mod_revision, 10);
        assert!(a.more);
        assert_eq!(a.count, 4);
    }

    proptest! {
        /// Reading only limit + 1 keys (no sort, no filter) answers exactly what reading
        /// every key would.
        #[test]
        fn a_partial_read_answers_like_a_whole_one(n in 0usize..30, limit in 0i64..35) {
            let all: Vec<KeyValue> = (0..n)
                .map(|i| kv(&format!("k{i:02}"), i as u64 + 1, i as u64 + 1, 1, "v"))
                .collect();
            let plan = RangePlan::new(&RangeRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                limit,
                ..Default::default()
            })
            .unwrap();
            let whole = plan.finish(all.clone(), n as u64);
            let part: Vec<KeyValue> = match plan.keys_to_read() {
                Some(k) => all.into_iter().take(k as usize).collect(),
                None => all,
            };
            prop_assert_eq!(plan.finish(part, n as u64), whole);
        }
    }
}
