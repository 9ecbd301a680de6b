//! The automerge-repo network protocol, as its JavaScript implementation
//! (`@automerge/automerge-repo` 2.x) speaks it over WebSocket: one CBOR map per binary frame,
//! told apart by its `type` field.
//!
//! This crate only encodes and decodes: [`Message`] and [`DocumentId`], with every limit
//! checked before anything is allocated from untrusted input. What a server does with the
//! messages (the Automerge sync state per peer and document, access checks, committing
//! through Raft) lives in the node (`node/src/server/automerge_repo`).
//!
//! A connection starts with the client's [`Message::Join`], answered by [`Message::Peer`];
//! then either side sends [`Message::Request`] / [`Message::Sync`] (the payload is an
//! Automerge sync message), [`Message::DocUnavailable`] when it has not got a document a
//! peer asked for, [`Message::Ephemeral`] (relayed, never stored) and [`Message::Leave`].

mod document_id;
mod message;

pub use document_id::{DocumentId, DocumentIdError, MAX_DOCUMENT_ID_BYTES, URL_PREFIX};
pub use message::{
    Message, PeerMetadata, WireError, MAX_ERROR_TEXT_BYTES, MAX_MESSAGE_BYTES, MAX_PEER_ID_BYTES,
    PROTOCOL_VERSION,
};
