//! Messages as the JavaScript automerge-repo (2.5.6, cbor-x) encodes them, and ours as bytes
//! pinned here (checked to decode in JavaScript by `node/tests/automerge-repo/`).

use aspen_repo_protocol::{DocumentId, Message, PeerMetadata, WireError, MAX_MESSAGE_BYTES};
use proptest::prelude::*;

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

/// `cbor.encode({type: "join", senderId: "peer-abc", peerMetadata: {storageId: undefined,
/// isEphemeral: true}, supportedProtocolVersions: ["1"]})` in automerge-repo 2.5.6.
const JS_JOIN: &str = "b900046474797065646a6f696e6873656e646572496468706565722d6162636c706565724d65746164617461b900026973746f726167654964f76b6973457068656d6572616cf57819737570706f7274656450726f746f636f6c56657273696f6e73816131";
/// A `sync` message with `data: new Uint8Array([0x42, 1, 2, 3])`, for the document whose id
/// bytes are 16 sevens.
const JS_SYNC: &str = "b9000564747970656473796e63687461726765744964687365727665722d31646461746144420102036a646f63756d656e744964781b36674d48586a735a356378646e34715362674759595938436e4b4b6873656e646572496468706565722d616263";

#[test]
fn javascript_join_decodes() {
    let m = Message::decode(&unhex(JS_JOIN)).unwrap();
    assert_eq!(
        m,
        Message::Join {
            sender_id: "peer-abc".into(),
            peer_metadata: PeerMetadata {
                storage_id: None,
                is_ephemeral: true
            },
            supported_protocol_versions: vec!["1".into()],
        }
    );
}

#[test]
fn javascript_sync_decodes() {
    let m = Message::decode(&unhex(JS_SYNC)).unwrap();
    assert_eq!(
        m,
        Message::Sync {
            sender_id: "peer-abc".into(),
            target_id: "server-1".into(),
            document_id: DocumentId::parse("6gMHXjsZ5cxdn4qSbgGYYY8CnKK").unwrap(),
            data: vec![0x42, 1, 2, 3],
        }
    );
}

#[test]
fn tag_64_byte_strings_decode() {
    // {type: "leave", senderId: "p"} and a sync whose data is tag 64 around bytes.
    let mut bytes = unhex(JS_SYNC);
    let plain = hex::decode("6464617461").unwrap(); // "data"
    let at = bytes
        .windows(plain.len())
        .position(|w| w == plain.as_slice())
        .unwrap()
        + plain.len();
    bytes.splice(at..at, [0xd8, 0x40]);
    let Message::Sync { data, .. } = Message::decode(&bytes).unwrap() else {
        panic!("not a sync message")
    };
    assert_eq!(data, vec![0x42, 1, 2, 3]);
}

/// Our encodings, pinned: a change here breaks every JavaScript client, so it must be
/// deliberate.
#[test]
fn our_encodings_are_stable() {
    let peer = Message::Peer {
        sender_id: "aspen-1".into(),
        target_id: "peer-abc".into(),
        peer_metadata: PeerMetadata {
            storage_id: None,
            is_ephemeral: false,
        },
        selected_protocol_version: "1".into(),
    };
    assert_eq!(
        hex::encode(peer.encode().unwrap()),
        "a564747970656470656572687365\
         6e64657249646761737065\
         6e2d3168746172676574496468706565722d6162636c706565724d65746164617461a16b69734570\
         68656d6572616cf47773656c656374656450726f746f636f6c56657273696f6e6131"
            .replace(char::is_whitespace, "")
    );
    let unavailable = Message::DocUnavailable {
        sender_id: "a".into(),
        target_id: "b".into(),
        document_id: DocumentId::from_bytes(&[0; 16]).unwrap(),
    };
    let bytes = unavailable.encode().unwrap();
    assert_eq!(Message::decode(&bytes).unwrap(), unavailable);
    assert_eq!(
        hex::encode(&bytes[..18]),
        "a464747970656f646f632d756e617661696c"
    );
}

#[test]
fn bad_messages_get_typed_errors() {
    let err = |bytes: &[u8]| Message::decode(bytes).unwrap_err();
    assert!(matches!(err(&[0xff, 0x00]), WireError::NotCbor(_)));
    assert!(matches!(err(&[]), WireError::NotCbor(_)));
    assert!(matches!(err(&unhex("8101")), WireError::NotAMap)); // [1]
    assert!(matches!(err(&unhex("a0")), WireError::NoType)); // {}
                                                             // {"type": "hello"}
    assert!(matches!(
        err(&unhex("a164747970656568656c6c6f")),
        WireError::UnknownType(t) if t == "hello"
    ));
    // {"type": "leave"} without senderId
    assert!(matches!(
        err(&unhex("a16474797065656c65617665")),
        WireError::Missing {
            kind: "leave",
            field: "senderId"
        }
    ));
    // A byte string claiming 2^32 bytes with 4 present: no allocation of that size.
    assert!(matches!(
        err(&unhex("5affffffff00000000")),
        WireError::NotCbor(_)
    ));
    // Deep nesting is refused, not a stack overflow.
    let mut deep = vec![0x81; 100_000];
    deep.push(0x01);
    assert!(matches!(err(&deep), WireError::NotCbor(_)));
    assert!(matches!(
        err(&vec![0u8; MAX_MESSAGE_BYTES + 1]),
        WireError::TooLarge(_)
    ));
    // A sync with a malformed document id.
    let mut bad = unhex(JS_SYNC);
    let id = b"6gMHXjsZ5cxdn4qSbgGYYY8CnKK";
    let at = bad.windows(id.len()).position(|w| w == id).unwrap();
    bad[at] = b'3';
    assert!(matches!(
        err(&bad),
        WireError::BadDocumentId { kind: "sync", .. }
    ));
}

fn peer_id() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9-]{1,40}"
}

fn document_id() -> impl Strategy<Value = DocumentId> {
    proptest::collection::vec(any::<u8>(), 16).prop_map(|b| DocumentId::from_bytes(&b).unwrap())
}

fn message() -> impl Strategy<Value = Message> {
    let data = proptest::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        (peer_id(), any::<bool>(), proptest::option::of(peer_id())).prop_map(|(s, e, st)| {
            Message::Join {
                sender_id: s,
                peer_metadata: PeerMetadata {
                    storage_id: st,
                    is_ephemeral: e,
                },
                supported_protocol_versions: vec!["1".into()],
            }
        }),
        (peer_id(), peer_id()).prop_map(|(s, t)| Message::Peer {
            sender_id: s,
            target_id: t,
            peer_metadata: PeerMetadata::default(),
            selected_protocol_version: "1".into(),
        }),
        ".{0,100}".prop_map(|m| Message::Error { message: m }),
        peer_id().prop_map(|s| Message::Leave { sender_id: s }),
        (peer_id(), peer_id(), document_id(), data.clone()).prop_map(|(s, t, d, b)| {
            Message::Sync {
                sender_id: s,
                target_id: t,
                document_id: d,
                data: b,
            }
        }),
        (peer_id(), peer_id(), document_id(), data.clone()).prop_map(|(s, t, d, b)| {
            Message::Request {
                sender_id: s,
                target_id: t,
                document_id: d,
                data: b,
            }
        }),
        (peer_id(), peer_id(), document_id()).prop_map(|(s, t, d)| Message::DocUnavailable {
            sender_id: s,
            target_id: t,
            document_id: d,
        }),
        (
            peer_id(),
            peer_id(),
            document_id(),
            "[a-z0-9]{1,30}",
            any::<u32>(),
            data
        )
            .prop_map(|(s, t, d, sess, c, b)| Message::Ephemeral {
                sender_id: s,
                target_id: t,
                document_id: d,
                session_id: sess,
                count: c.into(),
                data: b,
            }),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(m in message()) {
        let bytes = m.encode().unwrap();
        prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::decode(&bytes);
    }

    #[test]
    fn decoding_mangled_messages_never_panics(m in message(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = m.encode().unwrap();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        let _ = Message::decode(&bytes);
    }
}
