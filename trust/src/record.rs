//! The cluster record: who the members of a cluster are and where to reach them, signed by the
//! cluster key and published on the Mainline DHT as a BEP-44 mutable item.
//!
//! The value is a compact, versioned binary encoding (all integers big-endian), at most
//! [`MAX_RECORD_BYTES`] (BEP-44's limit):
//!
//! ```text
//! version       u8      = 1
//! issued_at     u64     Unix seconds
//! expires_at    u64     Unix seconds; resolvers refuse the record from then on
//! name          u8 length, then UTF-8 bytes (at most MAX_NAME_BYTES)
//! relay_url     u8 length, then UTF-8 bytes (0: none; at most MAX_RELAY_URL_BYTES)
//! members       u8 count (1..=MAX_RECORD_MEMBERS), then per member:
//!   node id     32 bytes (the member's iroh endpoint id)
//!   addrs       u8 count (at most MAX_RECORD_ADDRS_PER_MEMBER), then per address:
//!     family    u8 (4 or 6), then 4 or 16 address bytes, then u16 port
//! ```
//!
//! The signature is BEP-44's: Ed25519 by the cluster key over
//! `4:salt<len>:<RECORD_SALT>3:seqi<seq>e1:v<len>:<value>` ([`bep44_signable`]). The fixed salt
//! both names the DHT slot and separates this signature's domain from every [`crate::Context`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::cluster_key::{ClusterKey, ClusterSecretKey};

/// Largest encoded record value (BEP-44's limit on a mutable item's value).
pub const MAX_RECORD_BYTES: usize = 1000;
/// Most members listed (a cluster has 1-7 voters).
pub const MAX_RECORD_MEMBERS: usize = 7;
/// Most addresses listed per member.
pub const MAX_RECORD_ADDRS_PER_MEMBER: usize = 4;
/// Longest cluster name, in bytes.
pub const MAX_NAME_BYTES: usize = 63;
/// Longest relay URL, in bytes.
pub const MAX_RELAY_URL_BYTES: usize = 100;
/// Version byte of the record value.
pub const RECORD_VERSION: u8 = 1;
/// Version byte of [`SignedRecord::encode`] (the on-disk cache format).
pub const SIGNED_RECORD_VERSION: u8 = 1;
/// The BEP-44 salt every Aspen cluster record is published under.
pub const RECORD_SALT: &[u8] = b"aspen/cluster-record/v1";

/// One member as listed in a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMember {
    /// The member's iroh endpoint id.
    pub node: [u8; 32],
    /// Direct addresses to dial it at.
    pub addrs: Vec<SocketAddr>,
}

/// What a cluster publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRecord {
    pub name: String,
    pub relay_url: Option<String>,
    pub members: Vec<RecordMember>,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; the record is refused from this moment on.
    pub expires_at: u64,
}

impl ClusterRecord {
    /// Checks every bound, then encodes. Never truncates: a record over a limit is an error.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        if self.members.is_empty() {
            return Err(RecordError::NoMembers);
        }
        if self.members.len() > MAX_RECORD_MEMBERS {
            return Err(RecordError::TooManyMembers(self.members.len()));
        }
        if self.name.len() > MAX_NAME_BYTES {
            return Err(RecordError::NameTooLong(self.name.len()));
        }
        let relay = self.relay_url.as_deref().unwrap_or("");
        if relay.len() > MAX_RELAY_URL_BYTES {
            return Err(RecordError::RelayUrlTooLong(relay.len()));
        }
        if self.relay_url.as_deref() == Some("") {
            return Err(RecordError::EmptyRelayUrl);
        }
        if self.expires_at < self.issued_at {
            return Err(RecordError::ExpiresBeforeIssued);
        }
        let mut out = Vec::with_capacity(MAX_RECORD_BYTES);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.push(self.name.len() as u8);
        out.extend_from_slice(self.name.as_bytes());
        out.push(relay.len() as u8);
        out.extend_from_slice(relay.as_bytes());
        out.push(self.members.len() as u8);
        for m in &self.members {
            if m.addrs.len() > MAX_RECORD_ADDRS_PER_MEMBER {
                return Err(RecordError::TooManyAddrs(m.addrs.len()));
            }
            out.extend_from_slice(&m.node);
            out.push(m.addrs.len() as u8);
            for a in &m.addrs {
                match a.ip() {
                    IpAddr::V4(ip) => {
                        out.push(4);
                        out.extend_from_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        out.push(6);
                        out.extend_from_slice(&ip.octets());
                    }
                }
                out.extend_from_slice(&a.port().to_be_bytes());
            }
        }
        if out.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(out.len()));
        }
        Ok(out)
    }

    /// Decodes a record value strictly: every bound checked, no trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len()));
        }
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != RECORD_VERSION {
            return Err(RecordError::Version(version));
        }
        let issued_at = r.u64()?;
        let expires_at = r.u64()?;
        if expires_at < issued_at {
            return Err(RecordError::ExpiresBeforeIssued);
        }
        let name_len = r.u8()? as usize;
        if name_len > MAX_NAME_BYTES {
            return Err(RecordError::NameTooLong(name_len));
        }
        let name = r.utf8(name_len)?;
        let relay_len = r.u8()? as usize;
        if relay_len > MAX_RELAY_URL_BYTES {
            return Err(RecordError::RelayUrlTooLong(relay_len));
        }
        let relay_url = (relay_len > 0).then(|| r.utf8(relay_len)).transpose()?;
        let count = r.u8()? as usize;
        if count == 0 {
            return Err(RecordError::NoMembers);
        }
        if count > MAX_RECORD_MEMBERS {
            return Err(RecordError::TooManyMembers(count));
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            let node: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
            let n = r.u8()? as usize;
            if n > MAX_RECORD_ADDRS_PER_MEMBER {
                return Err(RecordError::TooManyAddrs(n));
            }
            let mut addrs = Vec::with_capacity(n);
            for _ in 0..n {
                let ip = match r.u8()? {
                    4 => IpAddr::V4(Ipv4Addr::from(
                        <[u8; 4]>::try_from(r.take(4)?).expect("4 bytes"),
                    )),
                    6 => IpAddr::V6(Ipv6Addr::from(
                        <[u8; 16]>::try_from(r.take(16)?).expect("16 bytes"),
                    )),
                    other => return Err(RecordError::AddressFamily(other)),
                };
                let port = u16::from_be_bytes(r.take(2)?.try_into().expect("2 bytes"));
                addrs.push(SocketAddr::new(ip, port));
            }
            members.push(RecordMember { node, addrs });
        }
        if !r.0.is_empty() {
            return Err(RecordError::TrailingBytes(r.0.len()));
        }
        Ok(ClusterRecord {
            name,
            relay_url,
            members,
            issued_at,
            expires_at,
        })
    }
}

/// A reader over untrusted bytes: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn utf8(&mut self, n: usize) -> Result<String, RecordError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| RecordError::NotUtf8)
    }
}

/// The bytes BEP-44 signs for a mutable item with a salt (bencoded `salt`, `seq`, `v`).
pub fn bep44_signable(salt: &[u8], seq: i64, value: &[u8]) -> Vec<u8> {
    let mut out = format!("4:salt{}:", salt.len()).into_bytes();
    out.extend_from_slice(salt);
    out.extend_from_slice(format!("3:seqi{seq}e1:v{}:", value.len()).as_bytes());
    out.extend_from_slice(value);
    out
}

/// A record value as signed for the DHT: exactly the BEP-44 item under the cluster key and
/// [`RECORD_SALT`]. Self-contained, so a cached copy is re-verified like a fresh one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedRecord {
    pub cluster: ClusterKey,
    /// BEP-44 sequence number; Aspen only issues non-negative, strictly increasing ones.
    pub seq: i64,
    /// The encoded [`ClusterRecord`].
    pub value: Vec<u8>,
    pub signature: [u8; 64],
}

impl SignedRecord {
    /// Encodes and signs `record` as item number `seq`.
    pub fn sign(
        secret: &ClusterSecretKey,
        record: &ClusterRecord,
        seq: i64,
    ) -> Result<Self, RecordError> {
        if seq < 0 {
            return Err(RecordError::NegativeSeq(seq));
        }
        let value = record.encode()?;
        let signature = secret.sign_raw(&bep44_signable(RECORD_SALT, seq, &value));
        Ok(SignedRecord {
            cluster: secret.public(),
            seq,
            value,
            signature,
        })
    }

    /// Verifies everything a resolver must before trusting the record: it is under `expected`,
    /// signed by it, well-formed, and not expired at `now` (Unix seconds).
    pub fn verify(&self, expected: &ClusterKey, now: u64) -> Result<ClusterRecord, RecordError> {
        if self.cluster != *expected {
            return Err(RecordError::WrongKey {
                expected: *expected,
                found: self.cluster,
            });
        }
        if self.seq < 0 {
            return Err(RecordError::NegativeSeq(self.seq));
        }
        if self.value.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(self.value.len()));
        }
        let signable = bep44_signable(RECORD_SALT, self.seq, &self.value);
        if !self.cluster.verify_raw(&signable, &self.signature) {
            return Err(RecordError::BadSignature);
        }
        let record = ClusterRecord::decode(&self.value)?;
        if now >= record.expires_at {
            return Err(RecordError::Expired {
                expires_at: record.expires_at,
                now,
            });
        }
        Ok(record)
    }

    /// Refuses a record older than one already trusted (a replay of an old item).
    pub fn check_not_older_than(&self, known_seq: i64) -> Result<(), RecordError> {
        if self.seq < known_seq {
            return Err(RecordError::Replayed {
                seq: self.seq,
                known: known_seq,
            });
        }
        Ok(())
    }

    /// The cache form: `version (1) || cluster key (32) || seq (i64) || signature (64) ||
    /// value length (u16) || value`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 32 + 8 + 64 + 2 + self.value.len());
        out.push(SIGNED_RECORD_VERSION);
        out.extend_from_slice(&self.cluster.to_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&(self.value.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    /// Decodes the cache form (does not verify: call [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != SIGNED_RECORD_VERSION {
            return Err(RecordError::Version(version));
        }
        let cluster = ClusterKey::from_bytes(r.take(32)?.try_into().expect("32 bytes"))
            .map_err(|_| RecordError::BadKey)?;
        let seq = i64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"));
        let signature: [u8; 64] = r.take(64)?.try_into().expect("64 bytes");
        let len = u16::from_be_bytes(r.take(2)?.try_into().expect("2 bytes")) as usize;
        if len > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(len));
        }
        let value = r.take(len)?.to_vec();
        if !r.0.is_empty() {
            return Err(RecordError::TrailingBytes(r.0.len()));
        }
        Ok(SignedRecord {
            cluster,
            seq,
            value,
            signature,
        })
    }
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is {0} bytes; the limit is {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("record lists no members")]
    NoMembers,
    #[error("record lists {0} members; the limit is {MAX_RECORD_MEMBERS}")]
    TooManyMembers(usize),
    #[error("a record member lists {0} addresses; the limit is {MAX_RECORD_ADDRS_PER_MEMBER}")]
    TooManyAddrs(usize),
    #[error("cluster name is {0} bytes; the limit is {MAX_NAME_BYTES}")]
    NameTooLong(usize),
    #[error("relay URL is {0} bytes; the limit is {MAX_RELAY_URL_BYTES}")]
    RelayUrlTooLong(usize),
    #[error("relay URL is empty")]
    EmptyRelayUrl,
    #[error("record expires before it was issued")]
    ExpiresBeforeIssued,
    #[error("unsupported record version {0}")]
    Version(u8),
    #[error("record is truncated")]
    Truncated,
    #[error("record has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("record text is not UTF-8")]
    NotUtf8,
    #[error("unknown address family {0} in record")]
    AddressFamily(u8),
    #[error("record key is not a valid Ed25519 key")]
    BadKey,
    #[error("record is signed by {found}, not by the cluster key {expected}")]
    WrongKey {
        expected: ClusterKey,
        found: ClusterKey,
    },
    #[error("record signature does not verify under the cluster key")]
    BadSignature,
    #[error("record sequence number {0} is negative")]
    NegativeSeq(i64),
    #[error("record expired at {expires_at} (now {now}, Unix seconds)")]
    Expired { expires_at: u64, now: u64 },
    #[error("record seq {seq} is older than the already trusted seq {known} (a replay)")]
    Replayed { seq: i64, known: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The largest record the limits allow: 7 members with 4 IPv6 addresses each, the longest
    /// name and relay URL.
    fn largest() -> ClusterRecord {
        let addr = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0xfe80, 1, 2, 3, 4, 5, 6, 7)),
            65535,
        );
        ClusterRecord {
            name: "n".repeat(MAX_NAME_BYTES),
            relay_url: Some("r".repeat(MAX_RELAY_URL_BYTES)),
            members: (0..MAX_RECORD_MEMBERS as u8)
                .map(|i| RecordMember {
                    node: [i; 32],
                    addrs: vec![addr; MAX_RECORD_ADDRS_PER_MEMBER],
                })
                .collect(),
            issued_at: u64::MAX - 1,
            expires_at: u64::MAX,
        }
    }

    #[test]
    fn a_full_seven_member_record_fits_bep44() {
        let bytes = largest().encode().unwrap();
        assert!(bytes.len() <= MAX_RECORD_BYTES, "{} bytes", bytes.len());
        assert_eq!(ClusterRecord::decode(&bytes).unwrap(), largest());
    }

    #[test]
    fn over_limit_records_are_refused_not_truncated() {
        let mut r = largest();
        r.members.push(r.members[0].clone());
        assert_eq!(r.encode(), Err(RecordError::TooManyMembers(8)));
        let mut r = largest();
        let a = r.members[0].addrs[0];
        r.members[0].addrs.push(a);
        assert_eq!(r.encode(), Err(RecordError::TooManyAddrs(5)));
        let mut r = largest();
        r.name.push('x');
        assert_eq!(r.encode(), Err(RecordError::NameTooLong(64)));
        let mut r = largest();
        r.members.clear();
        assert_eq!(r.encode(), Err(RecordError::NoMembers));
    }

    #[test]
    fn golden_value_bytes() {
        let r = ClusterRecord {
            name: "edge".into(),
            relay_url: None,
            members: vec![RecordMember {
                node: [0xab; 32],
                addrs: vec![
                    "127.0.0.1:7700".parse().unwrap(),
                    "[::1]:7701".parse().unwrap(),
                ],
            }],
            issued_at: 1,
            expires_at: 2,
        };
        let expected = format!(
            "01{}{}04{}0001{}02{}{}",
            "0000000000000001",
            "0000000000000002",
            hex::encode("edge"),
            "ab".repeat(32),
            "047f0000011e14",
            "0600000000000000000000000000000001".to_owned() + "1e15",
        );
        assert_eq!(hex::encode(r.encode().unwrap()), expected);
    }

    #[test]
    fn bep44_signable_matches_the_spec_example() {
        // BEP-44's own example: salt "foobar", seq 4, value "Hello World!".
        assert_eq!(
            bep44_signable(b"foobar", 4, b"Hello World!"),
            b"4:salt6:foobar3:seqi4e1:v12:Hello World!".to_vec()
        );
    }

    fn sample(now: u64) -> ClusterRecord {
        ClusterRecord {
            name: String::new(),
            relay_url: None,
            members: vec![RecordMember {
                node: [1; 32],
                addrs: vec!["127.0.0.1:1".parse().unwrap()],
            }],
            issued_at: now,
            expires_at: now + 100,
        }
    }

    #[test]
    fn signed_records_verify_and_refuse_forgeries() {
        let k = ClusterSecretKey::generate();
        let s = SignedRecord::sign(&k, &sample(1000), 5).unwrap();
        assert_eq!(s.verify(&k.public(), 1000).unwrap(), sample(1000));
        // Expired.
        assert!(matches!(
            s.verify(&k.public(), 1100),
            Err(RecordError::Expired { .. })
        ));
        // Asked for another cluster.
        let other = ClusterSecretKey::generate();
        assert!(matches!(
            s.verify(&other.public(), 1000),
            Err(RecordError::WrongKey { .. })
        ));
        // Signed by another key but claiming ours.
        let mut forged = SignedRecord::sign(&other, &sample(1000), 6).unwrap();
        forged.cluster = k.public();
        assert_eq!(
            forged.verify(&k.public(), 1000),
            Err(RecordError::BadSignature)
        );
        // A changed seq or value breaks the signature.
        let mut bumped = s.clone();
        bumped.seq += 1;
        assert_eq!(
            bumped.verify(&k.public(), 1000),
            Err(RecordError::BadSignature)
        );
        let mut edited = s.clone();
        edited.value[1] ^= 1;
        assert_eq!(
            edited.verify(&k.public(), 1000),
            Err(RecordError::BadSignature)
        );
        // Replays.
        assert_eq!(
            s.check_not_older_than(6),
            Err(RecordError::Replayed { seq: 5, known: 6 })
        );
        s.check_not_older_than(5).unwrap();
        assert_eq!(
            SignedRecord::sign(&k, &sample(1), -1),
            Err(RecordError::NegativeSeq(-1))
        );
    }

    #[test]
    fn cache_form_round_trips() {
        let k = ClusterSecretKey::generate();
        let s = SignedRecord::sign(&k, &largest(), i64::MAX).unwrap();
        let back = SignedRecord::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        back.verify(&k.public(), 0).unwrap();
        let mut bytes = s.encode();
        bytes.push(0);
        assert_eq!(
            SignedRecord::decode(&bytes),
            Err(RecordError::TrailingBytes(1))
        );
    }

    fn arb_record() -> impl Strategy<Value = ClusterRecord> {
        let addr = prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(ip.into()), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(ip.into()), p)),
        ];
        let member = (
            any::<[u8; 32]>(),
            proptest::collection::vec(addr, 0..=MAX_RECORD_ADDRS_PER_MEMBER),
        )
            .prop_map(|(node, addrs)| RecordMember { node, addrs });
        (
            "[a-z]{0,20}",
            proptest::option::of("[a-z:/.]{1,40}"),
            proptest::collection::vec(member, 1..=MAX_RECORD_MEMBERS),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(name, relay_url, members, a, b)| ClusterRecord {
                name,
                relay_url,
                members,
                issued_at: a.min(b),
                expires_at: a.max(b),
            })
    }

    proptest! {
        #[test]
        fn every_valid_record_round_trips(r in arb_record()) {
            let bytes = r.encode().unwrap();
            prop_assert!(bytes.len() <= MAX_RECORD_BYTES);
            prop_assert_eq!(ClusterRecord::decode(&bytes).unwrap(), r);
        }

        #[test]
        fn record_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if let Ok(r) = ClusterRecord::decode(&bytes) {
                // Strict: whatever decodes re-encodes to exactly the same bytes.
                prop_assert_eq!(r.encode().unwrap(), bytes);
            }
        }

        #[test]
        fn mutated_records_decode_or_fail_cleanly(r in arb_record(), at in any::<usize>(), b in any::<u8>()) {
            let mut bytes = r.encode().unwrap();
            let i = at % bytes.len();
            bytes[i] = b;
            let _ = ClusterRecord::decode(&bytes);
            bytes.truncate(i);
            prop_assert!(ClusterRecord::decode(&bytes).is_err());
        }

        #[test]
        fn cache_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            if let Ok(s) = SignedRecord::decode(&bytes) {
                prop_assert_eq!(s.encode(), bytes);
            }
        }
    }
}
