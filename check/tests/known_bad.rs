//! The checker must reject histories that no sequential order explains, and accept the ones
//! that some order does. Each case is a classic anomaly a broken store would show.

use aspen_check::{check, History, Op, Operation, Outcome};

fn k() -> Vec<u8> {
    b"k".to_vec()
}
fn v(s: &str) -> Option<Vec<u8>> {
    Some(s.as_bytes().to_vec())
}
fn get(client: u64, inv: u64, ret: u64, seen: Option<Vec<u8>>) -> Operation {
    Operation {
        client,
        op: Op::Get { key: k() },
        invoked_at: inv,
        returned: Some((ret, Outcome::Get(seen))),
    }
}
fn put(client: u64, inv: u64, ret: Option<u64>, val: &str) -> Operation {
    Operation {
        client,
        op: Op::Put {
            key: k(),
            value: val.as_bytes().to_vec(),
        },
        invoked_at: inv,
        returned: ret.map(|r| (r, Outcome::Put)),
    }
}
fn del(client: u64, inv: u64, ret: u64, existed: bool) -> Operation {
    Operation {
        client,
        op: Op::Delete { key: k() },
        invoked_at: inv,
        returned: Some((ret, Outcome::Delete { existed })),
    }
}
fn cas(
    client: u64,
    inv: u64,
    ret: u64,
    expect: Option<Vec<u8>>,
    new: &str,
    swapped: bool,
) -> Operation {
    Operation {
        client,
        op: Op::Cas {
            key: k(),
            expect,
            new: new.as_bytes().to_vec(),
        },
        invoked_at: inv,
        returned: Some((ret, Outcome::Cas { swapped })),
    }
}

fn assert_bad(ops: Vec<Operation>) {
    let report = check(&History::from_ops(ops));
    assert_eq!(report.anomalies.len(), 1, "expected an anomaly: {report}");
    // The report names the key and lists its operations.
    let text = report.to_string();
    assert!(text.contains("not linearizable"), "{text}");
}

fn assert_good(ops: Vec<Operation>) {
    let report = check(&History::from_ops(ops));
    assert!(report.is_linearizable(), "{report}");
}

#[test]
fn stale_read_after_a_completed_write() {
    // put(a) returns, then a later get still sees nothing: the read ignored a committed write
    // (what a follower serving "linearizable" reads from local state does).
    assert_bad(vec![put(1, 0, Some(1), "a"), get(2, 2, 3, None)]);
}

#[test]
fn read_of_a_value_never_written() {
    assert_bad(vec![put(1, 0, Some(1), "a"), get(2, 2, 3, v("zz"))]);
}

#[test]
fn new_then_old_inversion() {
    // While put(b) is in flight, one read sees b and a strictly later read sees a again.
    assert_bad(vec![
        put(1, 0, Some(1), "a"),
        put(1, 2, Some(9), "b"),
        get(2, 3, 4, v("b")),
        get(3, 5, 6, v("a")),
    ]);
}

#[test]
fn lost_update_two_cas_from_the_same_value_both_succeed() {
    assert_bad(vec![
        put(1, 0, Some(1), "0"),
        cas(2, 2, 5, v("0"), "x", true),
        cas(3, 3, 6, v("0"), "y", true),
    ]);
}

#[test]
fn cas_failure_that_must_have_succeeded() {
    assert_bad(vec![
        put(1, 0, Some(1), "0"),
        cas(2, 2, 3, v("0"), "x", false),
    ]);
}

#[test]
fn delete_that_reports_a_key_that_never_existed() {
    assert_bad(vec![del(1, 0, 1, true)]);
}

#[test]
fn write_applied_twice() {
    // A retried put applied a second time after a later put: the key flips back.
    assert_bad(vec![
        put(1, 0, Some(1), "a"),
        put(2, 2, Some(3), "b"),
        get(3, 4, 5, v("b")),
        get(3, 6, 7, v("a")),
    ]);
}

#[test]
fn concurrent_operations_may_take_either_order() {
    assert_good(vec![
        put(1, 0, Some(10), "a"),
        put(2, 1, Some(11), "b"),
        get(3, 2, 12, v("a")),
        get(4, 13, 14, v("b")),
    ]);
    assert_good(vec![
        put(1, 0, Some(1), "0"),
        cas(2, 2, 5, v("0"), "x", true),
        cas(3, 3, 6, v("0"), "y", false),
        get(4, 7, 8, v("x")),
    ]);
}

#[test]
fn unknown_writes_may_or_may_not_have_happened() {
    // Seen: the timed-out put took effect.
    assert_good(vec![put(1, 0, None, "a"), get(2, 5, 6, v("a"))]);
    // Not seen: it never took effect (or not yet).
    assert_good(vec![put(1, 0, None, "a"), get(2, 5, 6, None)]);
    // But it cannot take effect before it was invoked.
    assert_bad(vec![get(2, 0, 1, v("a")), put(1, 2, None, "a")]);
    // And once seen, it cannot be unseen.
    assert_bad(vec![
        put(1, 0, None, "a"),
        get(2, 5, 6, v("a")),
        get(2, 7, 8, None),
    ]);
}

#[test]
fn keys_are_checked_independently() {
    let mut ops = vec![put(1, 0, Some(1), "a"), get(2, 2, 3, v("a"))];
    ops.push(Operation {
        client: 3,
        op: Op::Get {
            key: b"other".to_vec(),
        },
        invoked_at: 4,
        returned: Some((5, Outcome::Get(v("ghost")))),
    });
    let report = check(&History::from_ops(ops));
    assert_eq!(report.keys, 2);
    assert_eq!(report.anomalies.len(), 1);
    assert_eq!(report.anomalies[0].keys, vec![b"other".to_vec()]);
}

#[test]
fn history_round_trips_through_json() {
    let h = History::from_ops(vec![put(1, 0, None, "a"), get(2, 1, 2, v("a"))]);
    assert_eq!(History::from_json(&h.to_json()).unwrap(), h);
}

fn range(client: u64, inv: u64, ret: u64, seen: &[(&str, &str)]) -> Operation {
    Operation {
        client,
        op: Op::Range {
            start: b"a".to_vec(),
            end: None,
        },
        invoked_at: inv,
        returned: Some((
            ret,
            Outcome::Range(
                seen.iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                    .collect(),
            ),
        )),
    }
}

fn put_key(client: u64, inv: u64, ret: u64, key: &str, val: &str) -> Operation {
    Operation {
        client,
        op: Op::Put {
            key: key.as_bytes().to_vec(),
            value: val.as_bytes().to_vec(),
        },
        invoked_at: inv,
        returned: Some((ret, Outcome::Put)),
    }
}

#[test]
fn a_range_read_must_see_one_point_in_time() {
    // x then y are written one after the other; a range that sees y must see x too.
    assert_bad(vec![
        put_key(1, 0, 1, "x", "1"),
        put_key(1, 2, 3, "y", "1"),
        range(2, 4, 5, &[("y", "1")]),
    ]);
    // Concurrent with the writes, it may see x alone.
    assert_good(vec![
        put_key(1, 0, 3, "x", "1"),
        put_key(1, 4, 7, "y", "1"),
        range(2, 2, 5, &[("x", "1")]),
    ]);
}

#[test]
fn a_multi_key_transaction_is_atomic() {
    let txn = Operation {
        client: 1,
        op: Op::Txn {
            compare: vec![(b"x".to_vec(), None)],
            success: vec![
                (b"x".to_vec(), Some(b"1".to_vec())),
                (b"y".to_vec(), Some(b"1".to_vec())),
            ],
            failure: vec![],
        },
        invoked_at: 0,
        returned: Some((5, Outcome::Txn { succeeded: true })),
    };
    // Seeing half of it afterwards is a torn transaction.
    assert_bad(vec![txn.clone(), range(2, 6, 7, &[("x", "1")])]);
    assert_good(vec![txn.clone(), range(2, 6, 7, &[("x", "1"), ("y", "1")])]);
    // During it, all or nothing.
    assert_good(vec![txn.clone(), range(2, 1, 2, &[])]);
    assert_bad(vec![txn, range(2, 1, 2, &[("y", "1")])]);
}
