//! The messages, one CBOR map each.
//!
//! Decoding takes what the JavaScript encoder (cbor-x) writes: maps with text keys in any
//! order, lengths in any width, byte strings plain or under tag 64 (a `Uint8Array`),
//! `undefined` where a field is absent, numbers as integers or floats. Unknown fields are
//! ignored, as automerge-repo ignores them; an unknown `type` is an error, so the caller can
//! answer it. Encoding writes plain definite-length maps and byte strings, which cbor-x
//! decodes as `Uint8Array`s.

use ciborium::Value;

use crate::document_id::{DocumentId, DocumentIdError};

/// The protocol version this implementation speaks (the only one automerge-repo 2.x knows).
pub const PROTOCOL_VERSION: &str = "1";
/// Largest message accepted or sent: an Automerge sync message can carry a whole document,
/// and Aspen's documents are at most 16 MiB, plus room for the fields around it.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;
/// Longest peer id (automerge-repo makes ids of a few dozen characters).
pub const MAX_PEER_ID_BYTES: usize = 256;
/// Longest text of an `error` message, and of a session id.
pub const MAX_ERROR_TEXT_BYTES: usize = 4096;
/// Most protocol versions a join may offer.
const MAX_VERSIONS: usize = 16;
/// Deepest nesting of CBOR accepted (peer metadata is the only nested part).
const MAX_DEPTH: usize = 16;

/// What a peer says of itself in `join` and `peer`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// Where the peer keeps documents, if it does (automerge-repo then remembers sync state
    /// with it across connections).
    pub storage_id: Option<String>,
    /// Whether the peer keeps nothing (a browser tab without storage).
    pub is_ephemeral: bool,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// The client's first message.
    Join {
        sender_id: String,
        peer_metadata: PeerMetadata,
        supported_protocol_versions: Vec<String>,
    },
    /// The server's answer to `join`.
    Peer {
        sender_id: String,
        target_id: String,
        peer_metadata: PeerMetadata,
        selected_protocol_version: String,
    },
    /// Sent instead of `peer` (or any time) when the connection cannot go on.
    Error { message: String },
    /// The peer is going away.
    Leave { sender_id: String },
    /// "Send me this document": `data` is an Automerge sync message.
    Request {
        sender_id: String,
        target_id: String,
        document_id: DocumentId,
        data: Vec<u8>,
    },
    /// `data` is an Automerge sync message for the document.
    Sync {
        sender_id: String,
        target_id: String,
        document_id: DocumentId,
        data: Vec<u8>,
    },
    /// The sender has not got the document asked for.
    DocUnavailable {
        sender_id: String,
        target_id: String,
        document_id: DocumentId,
    },
    /// Application data about a document that is relayed, never stored (cursors, presence).
    Ephemeral {
        sender_id: String,
        target_id: String,
        document_id: DocumentId,
        session_id: String,
        count: u64,
        data: Vec<u8>,
    },
    /// Subscriptions to other peers' storage heads (not served by Aspen; decoded so it can
    /// be ignored).
    RemoteSubscriptionChange { sender_id: String },
    /// Another storage's heads of a document (not served by Aspen; decoded so it can be
    /// ignored).
    RemoteHeadsChanged {
        sender_id: String,
        document_id: DocumentId,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message is {0} bytes, the limit is {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("not CBOR: {0}")]
    NotCbor(String),
    #[error("a message must be a CBOR map with text keys")]
    NotAMap,
    #[error("message has no 'type' field")]
    NoType,
    #[error("unknown message type '{0}'")]
    UnknownType(String),
    #[error("'{kind}' message: field '{field}' is missing")]
    Missing {
        kind: &'static str,
        field: &'static str,
    },
    #[error("'{kind}' message: field '{field}' {problem}")]
    BadField {
        kind: &'static str,
        field: &'static str,
        problem: String,
    },
    #[error("'{kind}' message: {source}")]
    BadDocumentId {
        kind: &'static str,
        #[source]
        source: DocumentIdError,
    },
}

impl Message {
    /// The message's `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Join { .. } => "join",
            Message::Peer { .. } => "peer",
            Message::Error { .. } => "error",
            Message::Leave { .. } => "leave",
            Message::Request { .. } => "request",
            Message::Sync { .. } => "sync",
            Message::DocUnavailable { .. } => "doc-unavailable",
            Message::Ephemeral { .. } => "ephemeral",
            Message::RemoteSubscriptionChange { .. } => "remote-subscription-change",
            Message::RemoteHeadsChanged { .. } => "remote-heads-changed",
        }
    }

    /// Decodes one message (one WebSocket frame).
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(bytes.len()));
        }
        // ciborium bounds nesting by its recursion limit and allocates no more than the
        // input holds for strings; lengths larger than the input fail as end of input.
        let value: Value = ciborium::de::from_reader_with_recursion_limit(bytes, MAX_DEPTH)
            .map_err(|e| WireError::NotCbor(e.to_string()))?;
        let Value::Map(entries) = value else {
            return Err(WireError::NotAMap);
        };
        let fields = Fields::new(entries)?;
        let kind = match fields.get("type") {
            Some(Value::Text(t)) => t.as_str(),
            Some(_) => return Err(WireError::NotAMap),
            None => return Err(WireError::NoType),
        };
        let f = |k: &'static str| FieldReader {
            kind: k,
            fields: &fields,
        };
        Ok(match kind {
            "join" => {
                let r = f("join");
                Message::Join {
                    sender_id: r.peer_id("senderId")?,
                    peer_metadata: r.metadata("peerMetadata")?,
                    supported_protocol_versions: r.versions("supportedProtocolVersions")?,
                }
            }
            "peer" => {
                let r = f("peer");
                Message::Peer {
                    sender_id: r.peer_id("senderId")?,
                    target_id: r.peer_id("targetId")?,
                    peer_metadata: r.metadata("peerMetadata")?,
                    selected_protocol_version: r.text("selectedProtocolVersion", 64)?,
                }
            }
            "error" => Message::Error {
                message: f("error").text("message", MAX_ERROR_TEXT_BYTES)?,
            },
            "leave" => Message::Leave {
                sender_id: f("leave").peer_id("senderId")?,
            },
            "request" | "sync" => {
                let r = f(if kind == "sync" { "sync" } else { "request" });
                let (sender_id, target_id) = (r.peer_id("senderId")?, r.peer_id("targetId")?);
                let (document_id, data) = (r.document_id()?, r.bytes("data")?);
                if kind == "sync" {
                    Message::Sync {
                        sender_id,
                        target_id,
                        document_id,
                        data,
                    }
                } else {
                    Message::Request {
                        sender_id,
                        target_id,
                        document_id,
                        data,
                    }
                }
            }
            "doc-unavailable" => {
                let r = f("doc-unavailable");
                Message::DocUnavailable {
                    sender_id: r.peer_id("senderId")?,
                    target_id: r.peer_id("targetId")?,
                    document_id: r.document_id()?,
                }
            }
            "ephemeral" => {
                let r = f("ephemeral");
                Message::Ephemeral {
                    sender_id: r.peer_id("senderId")?,
                    target_id: r.peer_id("targetId")?,
                    document_id: r.document_id()?,
                    session_id: r.text("sessionId", MAX_ERROR_TEXT_BYTES)?,
                    count: r.count("count")?,
                    data: r.bytes("data")?,
                }
            }
            "remote-subscription-change" => Message::RemoteSubscriptionChange {
                sender_id: f("remote-subscription-change").peer_id("senderId")?,
            },
            "remote-heads-changed" => {
                let r = f("remote-heads-changed");
                Message::RemoteHeadsChanged {
                    sender_id: r.peer_id("senderId")?,
                    document_id: r.document_id()?,
                }
            }
            other => {
                return Err(WireError::UnknownType(
                    other.chars().take(64).collect::<String>(),
                ))
            }
        })
    }

    /// Encodes the message as one CBOR map. Fails only past [`MAX_MESSAGE_BYTES`] (a sync
    /// message carrying more than a document may hold).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let text = |s: &str| Value::Text(s.to_string());
        let mut m: Vec<(&str, Value)> = vec![("type", text(self.kind()))];
        match self {
            Message::Join {
                sender_id,
                peer_metadata,
                supported_protocol_versions,
            } => {
                m.push(("senderId", text(sender_id)));
                m.push(("peerMetadata", metadata_value(peer_metadata)));
                m.push((
                    "supportedProtocolVersions",
                    Value::Array(
                        supported_protocol_versions
                            .iter()
                            .map(|v| text(v))
                            .collect(),
                    ),
                ));
            }
            Message::Peer {
                sender_id,
                target_id,
                peer_metadata,
                selected_protocol_version,
            } => {
                m.push(("senderId", text(sender_id)));
                m.push(("targetId", text(target_id)));
                m.push(("peerMetadata", metadata_value(peer_metadata)));
                m.push(("selectedProtocolVersion", text(selected_protocol_version)));
            }
            Message::Error { message } => m.push(("message", text(message))),
            Message::Leave { sender_id } => m.push(("senderId", text(sender_id))),
            Message::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
            | Message::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            } => {
                m.push(("senderId", text(sender_id)));
                m.push(("targetId", text(target_id)));
                m.push(("documentId", text(document_id.as_str())));
                m.push(("data", Value::Bytes(data.clone())));
            }
            Message::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            } => {
                m.push(("senderId", text(sender_id)));
                m.push(("targetId", text(target_id)));
                m.push(("documentId", text(document_id.as_str())));
            }
            Message::Ephemeral {
                sender_id,
                target_id,
                document_id,
                session_id,
                count,
                data,
            } => {
                m.push(("senderId", text(sender_id)));
                m.push(("targetId", text(target_id)));
                m.push(("documentId", text(document_id.as_str())));
                m.push(("sessionId", text(session_id)));
                m.push(("count", Value::Integer((*count).into())));
                m.push(("data", Value::Bytes(data.clone())));
            }
            Message::RemoteSubscriptionChange { sender_id } => {
                m.push(("senderId", text(sender_id)))
            }
            Message::RemoteHeadsChanged {
                sender_id,
                document_id,
            } => {
                m.push(("senderId", text(sender_id)));
                m.push(("documentId", text(document_id.as_str())));
            }
        }
        let map = Value::Map(m.into_iter().map(|(k, v)| (text(k), v)).collect());
        let mut out = Vec::new();
        ciborium::ser::into_writer(&map, &mut out).expect("writing to a Vec cannot fail");
        if out.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(out.len()));
        }
        Ok(out)
    }
}

fn metadata_value(m: &PeerMetadata) -> Value {
    let mut entries = Vec::new();
    if let Some(s) = &m.storage_id {
        entries.push((Value::Text("storageId".into()), Value::Text(s.clone())));
    }
    entries.push((
        Value::Text("isEphemeral".into()),
        Value::Bool(m.is_ephemeral),
    ));
    Value::Map(entries)
}

/// A message's fields by name (text keys only; other keys are ignored).
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn new(entries: Vec<(Value, Value)>) -> Result<Self, WireError> {
        Ok(Fields(
            entries
                .into_iter()
                .filter_map(|(k, v)| match k {
                    Value::Text(k) => Some((k, v)),
                    _ => None,
                })
                .collect(),
        ))
    }

    /// The field, if present and not null or undefined (ciborium reads CBOR `undefined`,
    /// which cbor-x writes for absent fields, as null).
    fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }
}

struct FieldReader<'a> {
    kind: &'static str,
    fields: &'a Fields,
}

impl FieldReader<'_> {
    fn required(&self, field: &'static str) -> Result<&Value, WireError> {
        self.fields.get(field).ok_or(WireError::Missing {
            kind: self.kind,
            field,
        })
    }

    fn bad(&self, field: &'static str, problem: impl Into<String>) -> WireError {
        WireError::BadField {
            kind: self.kind,
            field,
            problem: problem.into(),
        }
    }

    fn text(&self, field: &'static str, max: usize) -> Result<String, WireError> {
        match self.required(field)? {
            Value::Text(t) if t.len() <= max => Ok(t.clone()),
            Value::Text(t) => Err(self.bad(field, format!("is {} bytes, at most {max}", t.len()))),
            _ => Err(self.bad(field, "is not text")),
        }
    }

    fn peer_id(&self, field: &'static str) -> Result<String, WireError> {
        let id = self.text(field, MAX_PEER_ID_BYTES)?;
        if id.is_empty() || id.chars().any(char::is_control) {
            return Err(self.bad(field, "is not a peer id (empty or control characters)"));
        }
        Ok(id)
    }

    fn document_id(&self) -> Result<DocumentId, WireError> {
        let Value::Text(t) = self.required("documentId")? else {
            return Err(self.bad("documentId", "is not text"));
        };
        DocumentId::parse(t).map_err(|source| WireError::BadDocumentId {
            kind: self.kind,
            source,
        })
    }

    fn bytes(&self, field: &'static str) -> Result<Vec<u8>, WireError> {
        match self.required(field)? {
            Value::Bytes(b) => Ok(b.clone()),
            // cbor-x's tag for a Uint8Array.
            Value::Tag(64, inner) => match inner.as_ref() {
                Value::Bytes(b) => Ok(b.clone()),
                _ => Err(self.bad(field, "is tag 64 around something other than bytes")),
            },
            _ => Err(self.bad(field, "is not a byte string")),
        }
    }

    /// A non-negative integer; cbor-x writes large numbers as floats.
    fn count(&self, field: &'static str) -> Result<u64, WireError> {
        match self.required(field)? {
            Value::Integer(i) => u64::try_from(*i).map_err(|_| self.bad(field, "is negative")),
            Value::Float(f) if f.fract() == 0.0 && *f >= 0.0 && *f < 2f64.powi(53) => Ok(*f as u64),
            _ => Err(self.bad(field, "is not a non-negative whole number")),
        }
    }

    fn versions(&self, field: &'static str) -> Result<Vec<String>, WireError> {
        // Absent in old clients: they speak version 1.
        let Some(v) = self.fields.get(field) else {
            return Ok(vec![PROTOCOL_VERSION.to_string()]);
        };
        let Value::Array(items) = v else {
            return Err(self.bad(field, "is not an array"));
        };
        if items.len() > MAX_VERSIONS {
            return Err(self.bad(field, format!("offers more than {MAX_VERSIONS} versions")));
        }
        items
            .iter()
            .map(|i| match i {
                Value::Text(t) if t.len() <= 64 => Ok(t.clone()),
                _ => Err(self.bad(field, "holds something other than short text")),
            })
            .collect()
    }

    /// Peer metadata; absent or malformed parts read as defaults (it is advisory).
    fn metadata(&self, field: &'static str) -> Result<PeerMetadata, WireError> {
        let Some(Value::Map(entries)) = self.fields.get(field) else {
            return Ok(PeerMetadata::default());
        };
        let mut m = PeerMetadata::default();
        for (k, v) in entries {
            match (k, v) {
                (Value::Text(k), Value::Text(s)) if k == "storageId" => {
                    if s.len() > MAX_PEER_ID_BYTES {
                        return Err(self.bad(field, "storageId is too long"));
                    }
                    m.storage_id = Some(s.clone());
                }
                (Value::Text(k), Value::Bool(b)) if k == "isEphemeral" => m.is_ephemeral = *b,
                _ => {}
            }
        }
        Ok(m)
    }
}
