//! The encodings stored in the log, the state machine and snapshots must never change for
//! existing variants: these bytes pin them. (New variants are appended, never inserted.)

use aspen_kv::api::*;

fn bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap()
}

#[test]
fn batch_encoding_is_stable() {
    let batch = Batch {
        proposed_at_ms: 1,
        proposal: 2,
        commands: vec![
            Command {
                session: Some(Session {
                    client_id: 3,
                    seq: 4,
                    acked_below: 4,
                }),
                op: WriteOp::Put {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                    prev_kv: true,
                },
            },
            Command {
                session: None,
                op: WriteOp::Delete {
                    start: b"a".to_vec(),
                    end: Some(vec![]),
                    prev_kv: false,
                },
            },
            Command {
                session: None,
                op: WriteOp::Compact { revision: 9 },
            },
        ],
    };
    assert_eq!(
        bytes(&batch),
        [1, 2, 3, 1, 3, 4, 4, 0, 1, b'k', 1, b'v', 1, 0, 1, 1, b'a', 1, 0, 0, 0, 2, 9]
    );
}

#[test]
fn command_results_encoding_is_stable() {
    let kv = KeyValue {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        create_revision: 1,
        mod_revision: 2,
        version: 2,
        lease: 0,
    };
    let ok: CommandResult = Ok(WriteOutcome::Put {
        revision: 5,
        prev: Some(kv),
    });
    assert_eq!(bytes(&ok), [0, 0, 5, 1, 1, b'k', 1, b'v', 1, 2, 2, 0]);
    let err: CommandResult = Err(ApplyError::StaleSequence {
        client_id: 1,
        seq: 2,
    });
    assert_eq!(bytes(&err), [1, 1, 1, 2]);
    let limit: CommandResult = Err(ApplyError::Limit(LimitError::KeyTooLarge {
        len: 5000,
        max: 4096,
    }));
    assert_eq!(bytes(&limit), [1, 0, 1, 0x88, 0x27, 0x80, 0x20]);
}

#[test]
fn range_request_encoding_is_stable() {
    let r = RangeRequest {
        start: b"a".to_vec(),
        end: Some(b"b".to_vec()),
        limit: 10,
        revision: 3,
    };
    assert_eq!(bytes(&r), [1, b'a', 1, 1, b'b', 10, 3]);
}

#[test]
fn txn_encoding_is_stable() {
    let op = WriteOp::Txn(Txn {
        compare: vec![Compare {
            key: b"k".to_vec(),
            target: CompareTarget::Value(b"v".to_vec()),
            op: CompareOp::NotEqual,
        }],
        success: vec![TxnOp::Put {
            key: b"k".to_vec(),
            value: b"w".to_vec(),
            prev_kv: false,
        }],
        failure: vec![TxnOp::Delete {
            start: b"k".to_vec(),
            end: None,
            prev_kv: true,
        }],
    });
    assert_eq!(
        bytes(&op),
        [3, 1, 1, b'k', 3, 1, b'v', 1, 1, 0, 1, b'k', 1, b'w', 0, 1, 1, 1, b'k', 0, 1]
    );
    let out: CommandResult = Ok(WriteOutcome::Txn {
        revision: 7,
        succeeded: true,
        results: vec![WriteOutcome::Put {
            revision: 7,
            prev: None,
        }],
    });
    assert_eq!(bytes(&out), [0, 3, 7, 1, 1, 0, 7, 0]);
}

#[test]
fn txn_tree_encoding_is_stable() {
    let op = WriteOp::TxnTree(TxnTree {
        nodes: vec![
            Txn {
                compare: vec![],
                success: vec![TxnOp::Nested(1)],
                failure: vec![],
            },
            Txn {
                compare: vec![],
                success: vec![TxnOp::Put {
                    key: b"k".to_vec(),
                    value: b"w".to_vec(),
                    prev_kv: false,
                }],
                failure: vec![],
            },
        ],
        ranges: vec![CompareRange {
            node: 1,
            compare: 2,
            end: b"z".to_vec(),
        }],
    });
    assert_eq!(
        bytes(&op),
        [10, 2, 0, 1, 3, 1, 0, 0, 1, 0, 1, b'k', 1, b'w', 0, 0, 1, 1, 2, 1, b'z']
    );
    assert_eq!(bytes(&LimitError::CompareRangeTooLarge { max: 5 }), [12, 5]);
    let refused = LimitError::BadTxnTree("x".into());
    assert_eq!(bytes(&refused), [11, 1, b'x']);
}

#[test]
fn system_write_encoding_is_stable() {
    let op = WriteOp::System(SystemWrite {
        key: b"k".to_vec(),
        expect: Some(None),
        new: Some(b"v".to_vec()),
    });
    assert_eq!(bytes(&op), [4, 1, b'k', 1, 0, 1, 1, b'v']);
    let out: CommandResult = Ok(WriteOutcome::System {
        revision: 7,
        written: false,
        current: Some(b"v".to_vec()),
    });
    assert_eq!(bytes(&out), [0, 4, 7, 0, 1, 1, b'v']);
}

#[test]
fn system_txn_encoding_is_stable() {
    let op = WriteOp::SystemTxn(SystemTxn {
        require: vec![(b"m".to_vec(), Some(b"1".to_vec())), (b"n".to_vec(), None)],
        writes: vec![
            SystemOp::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
            SystemOp::Delete { key: b"d".to_vec() },
            SystemOp::DeletePrefix {
                prefix: b"p".to_vec(),
            },
        ],
    });
    assert_eq!(
        bytes(&op),
        [5, 2, 1, b'm', 1, 1, b'1', 1, b'n', 0, 3, 0, 1, b'k', 1, b'v', 1, 1, b'd', 2, 1, b'p']
    );
    let out: CommandResult = Ok(WriteOutcome::SystemTxn {
        revision: 7,
        applied: true,
    });
    assert_eq!(bytes(&out), [0, 5, 7, 1]);
}

#[test]
fn lease_encodings_are_stable() {
    assert_eq!(
        bytes(&WriteOp::LeaseGrant {
            id: 7,
            ttl_secs: 10
        }),
        [6, 7, 10]
    );
    assert_eq!(bytes(&WriteOp::LeaseRevoke { id: 300 }), [7, 0xac, 0x02]);
    assert_eq!(bytes(&WriteOp::LeaseExpire { id: 1, grant: 2 }), [8, 1, 2]);
    let options = PutOptions {
        lease: 5,
        ignore_value: false,
        ignore_lease: true,
    };
    let put = WriteOp::PutWith {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        prev_kv: true,
        options: options.clone(),
    };
    assert_eq!(bytes(&put), [9, 1, b'k', 1, b'v', 1, 5, 0, 1]);
    let txn_put = TxnOp::PutWith {
        key: b"k".to_vec(),
        value: vec![],
        prev_kv: false,
        options,
    };
    assert_eq!(bytes(&txn_put), [2, 1, b'k', 0, 0, 5, 0, 1]);
    let compare = Compare {
        key: b"k".to_vec(),
        target: CompareTarget::Lease(5),
        op: CompareOp::Equal,
    };
    assert_eq!(bytes(&compare), [1, b'k', 4, 5, 0]);
    let granted: CommandResult = Ok(WriteOutcome::LeaseGrant {
        revision: 1,
        id: 2,
        ttl_secs: 3,
        grant: 4,
    });
    assert_eq!(bytes(&granted), [0, 6, 1, 2, 3, 4]);
    let revoked: CommandResult = Ok(WriteOutcome::LeaseRevoke {
        revision: 9,
        deleted: 2,
        revoked: true,
    });
    assert_eq!(bytes(&revoked), [0, 7, 9, 2, 1]);
    let errors: [(ApplyError, &[u8]); 6] = [
        (ApplyError::LeaseNotFound { id: 7 }, &[5, 7]),
        (ApplyError::LeaseExists { id: 7 }, &[6, 7]),
        (ApplyError::TooManyLeases { max: 9 }, &[7, 9]),
        (ApplyError::LeaseFull { id: 1, max: 2 }, &[8, 1, 2]),
        (
            ApplyError::KeyNotFound { key: b"k".to_vec() },
            &[9, 1, b'k'],
        ),
        (
            ApplyError::Limit(LimitError::LeaseTtlOutOfRange {
                ttl_secs: 1,
                min: 2,
                max: 3,
            }),
            &[0, 9, 1, 2, 3],
        ),
    ];
    for (e, want) in errors {
        assert_eq!(bytes(&e), want, "{e:?}");
    }
    assert_eq!(
        bytes(&LimitError::LeaseIdOutOfRange { id: 0, max: 1 }),
        [8, 0, 1]
    );
    assert_eq!(
        bytes(&LimitError::InvalidPutOptions("x".into())),
        [10, 1, b'x']
    );
    let record = LeaseRecord {
        id: 1,
        ttl_secs: 2,
        grant: 3,
        key_count: 1,
        keys: vec![b"k".to_vec()],
    };
    assert_eq!(bytes(&record), [1, 2, 3, 1, 1, 1, b'k']);
}
