//! What users see of a document: its JSON view, heads and history.

use automerge::{AutoSerde, Automerge};
use serde::Serialize;

/// The document as JSON (maps become objects, lists arrays, text strings, counters numbers).
pub fn to_json(doc: &Automerge) -> serde_json::Value {
    serde_json::to_value(AutoSerde::from(doc)).expect("an Automerge document is valid JSON")
}

/// The document's heads, as hex.
pub fn heads(doc: &Automerge) -> Vec<String> {
    doc.get_heads().iter().map(|h| h.to_string()).collect()
}

/// One change of a document's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    pub hash: String,
    pub actor: String,
    pub seq: u64,
    /// The time its author recorded (Unix seconds for this crate's changes; 0: none).
    pub time: i64,
    pub message: Option<String>,
    pub deps: Vec<String>,
    /// Operations in the change.
    pub ops: usize,
}

/// Every change of the document in causal order.
pub fn history(doc: &Automerge) -> Vec<HistoryEntry> {
    doc.get_changes(&[])
        .iter()
        .map(|c| HistoryEntry {
            hash: c.hash().to_string(),
            actor: c.actor_id().to_hex_string(),
            seq: c.seq(),
            time: c.timestamp(),
            message: c.message().map(str::to_owned),
            deps: c.deps().iter().map(|d| d.to_string()).collect(),
            ops: c.len(),
        })
        .collect()
}
