//! Tickets: how a user hands a node or a cluster to the CLI.
//!
//! A ticket is a prefix naming its kind and version, then lowercase base32 (no padding) of the
//! postcard encoding. `aspennode1...` names one node (its public key and direct addresses);
//! `aspencluster1...` lists the members of a cluster. Decoding is strict: every malformed
//! ticket is a typed error, and the length is checked before decoding.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

/// Prefix of a node ticket.
pub const NODE_TICKET_PREFIX: &str = "aspennode1";
/// Prefix of a cluster ticket.
pub const CLUSTER_TICKET_PREFIX: &str = "aspencluster1";
/// Longest ticket accepted, in characters.
pub const MAX_TICKET_CHARS: usize = 8 * 1024;
/// Most addresses per node in a ticket.
pub const MAX_ADDRS_PER_NODE: usize = 16;
/// Most members in a cluster ticket (clusters have at most 7 voters, plus learners).
pub const MAX_TICKET_MEMBERS: usize = 16;

/// A node: its public key (iroh endpoint id) and the addresses it listens on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTicket {
    pub endpoint_id: [u8; 32],
    pub addrs: Vec<SocketAddr>,
}

/// The members of a cluster, enough to connect to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTicket {
    pub members: Vec<NodeTicket>,
}

/// Why a ticket could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket is empty")]
    Empty,
    #[error("ticket is {len} characters, the limit is {MAX_TICKET_CHARS}")]
    TooLong { len: usize },
    #[error("not a {expected} ticket (it should start with '{prefix}')")]
    WrongKind {
        expected: &'static str,
        prefix: &'static str,
    },
    #[error("ticket is not valid base32: {0}")]
    Encoding(String),
    #[error("ticket payload is malformed: {0}")]
    Payload(String),
    #[error("ticket has {len} {what}, the limit is {max}")]
    TooMany {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("cluster ticket lists no members")]
    NoMembers,
}

fn decode<T: for<'a> Deserialize<'a>>(
    s: &str,
    prefix: &'static str,
    kind: &'static str,
) -> Result<T, TicketError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(TicketError::Empty);
    }
    if s.len() > MAX_TICKET_CHARS {
        return Err(TicketError::TooLong { len: s.len() });
    }
    let body = s.strip_prefix(prefix).ok_or(TicketError::WrongKind {
        expected: kind,
        prefix,
    })?;
    let bytes = BASE32_NOPAD
        .decode(body.to_ascii_uppercase().as_bytes())
        .map_err(|e| TicketError::Encoding(e.to_string()))?;
    let (value, rest) =
        postcard::take_from_bytes(&bytes).map_err(|e| TicketError::Payload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(TicketError::Payload(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(value)
}

fn encode<T: Serialize>(value: &T, prefix: &str) -> String {
    let bytes = postcard::to_allocvec(value).expect("tickets always encode");
    format!(
        "{prefix}{}",
        BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
    )
}

impl NodeTicket {
    fn check(&self) -> Result<(), TicketError> {
        if self.addrs.len() > MAX_ADDRS_PER_NODE {
            return Err(TicketError::TooMany {
                what: "addresses",
                len: self.addrs.len(),
                max: MAX_ADDRS_PER_NODE,
            });
        }
        Ok(())
    }

    /// The Raft node id Aspen derives from the public key: its first 8 bytes, big-endian.
    pub fn node_id(&self) -> u64 {
        node_id_of(&self.endpoint_id)
    }
}

/// The Raft node id of a public key: its first 8 bytes, big-endian.
pub fn node_id_of(endpoint_id: &[u8; 32]) -> u64 {
    u64::from_be_bytes(endpoint_id[..8].try_into().expect("8 bytes"))
}

impl fmt::Display for NodeTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode(self, NODE_TICKET_PREFIX))
    }
}

impl FromStr for NodeTicket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, TicketError> {
        let t: NodeTicket = decode(s, NODE_TICKET_PREFIX, "node")?;
        t.check()?;
        Ok(t)
    }
}

impl fmt::Display for ClusterTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode(self, CLUSTER_TICKET_PREFIX))
    }
}

impl FromStr for ClusterTicket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, TicketError> {
        let t: ClusterTicket = decode(s, CLUSTER_TICKET_PREFIX, "cluster")?;
        if t.members.is_empty() {
            return Err(TicketError::NoMembers);
        }
        if t.members.len() > MAX_TICKET_MEMBERS {
            return Err(TicketError::TooMany {
                what: "members",
                len: t.members.len(),
                max: MAX_TICKET_MEMBERS,
            });
        }
        for m in &t.members {
            m.check()?;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(b: u8) -> NodeTicket {
        NodeTicket {
            endpoint_id: [b; 32],
            addrs: vec!["127.0.0.1:4000".parse().unwrap()],
        }
    }

    #[test]
    fn tickets_round_trip() {
        let n = node(1);
        assert_eq!(n.to_string().parse::<NodeTicket>().unwrap(), n);
        let c = ClusterTicket {
            members: vec![node(1), node(2)],
        };
        assert_eq!(c.to_string().parse::<ClusterTicket>().unwrap(), c);
        assert_eq!(n.node_id(), 0x0101010101010101);
    }

    #[test]
    fn golden_node_ticket() {
        // Stable encoding: changing it breaks every ticket users have saved.
        let t = NodeTicket {
            endpoint_id: [0; 32],
            addrs: vec!["127.0.0.1:1".parse().unwrap()],
        };
        assert_eq!(
            t.to_string(),
            "aspennode1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaacad7aaaacai"
        );
    }

    #[test]
    fn malformed_tickets_are_typed_errors() {
        assert_eq!("".parse::<NodeTicket>(), Err(TicketError::Empty));
        assert!(matches!(
            "hello".parse::<NodeTicket>(),
            Err(TicketError::WrongKind { .. })
        ));
        let cluster = ClusterTicket {
            members: vec![node(1)],
        }
        .to_string();
        assert!(matches!(
            cluster.parse::<NodeTicket>(),
            Err(TicketError::WrongKind { .. })
        ));
        assert!(matches!(
            "aspennode1!!!".parse::<NodeTicket>(),
            Err(TicketError::Encoding(_))
        ));
        assert!(matches!(
            "aspennode1aaaa".parse::<NodeTicket>(),
            Err(TicketError::Payload(_))
        ));
        let long = format!("aspennode1{}", "a".repeat(MAX_TICKET_CHARS));
        assert!(matches!(
            long.parse::<NodeTicket>(),
            Err(TicketError::TooLong { .. })
        ));
        let empty = ClusterTicket { members: vec![] }.to_string();
        assert_eq!(empty.parse::<ClusterTicket>(), Err(TicketError::NoMembers));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_text_never_panics(s in ".{0,300}") {
            let _ = s.parse::<NodeTicket>();
            let _ = s.parse::<ClusterTicket>();
        }

        #[test]
        fn decoding_arbitrary_payloads_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let s = format!("{NODE_TICKET_PREFIX}{}", BASE32_NOPAD.encode(&bytes).to_ascii_lowercase());
            let _ = s.parse::<NodeTicket>();
            let s = format!("{CLUSTER_TICKET_PREFIX}{}", BASE32_NOPAD.encode(&bytes).to_ascii_lowercase());
            let _ = s.parse::<ClusterTicket>();
        }
    }
}
