//! Keys, domain-separated signatures and signed records. Pure: no I/O, no async, no clock
//! (callers pass the current time in).
//!
//! - [`NodeKey`]: a node's Ed25519 secret (its iroh endpoint key) and its key-file format.
//! - [`ClusterSecretKey`] / [`ClusterKey`]: the cluster's Ed25519 key pair. The secret is
//!   replicated to members through Raft so any member can sign for the cluster; the public key
//!   is how the world names the cluster.
//! - [`Context`]: every signature Aspen makes covers `context || exact bytes`, with one
//!   versioned context per purpose, so a signature made for one purpose never verifies for
//!   another.
//! - [`NodeCertificate`]: the cluster key vouching that a node id belongs to the cluster.
//! - [`ClusterRecord`] / [`SignedRecord`]: the compact record published on the Mainline DHT as
//!   a BEP-44 mutable item (format in ARCHITECTURE.md, "Cluster record").
//! - [`Permission`]: `KIND:ACTION:PATTERN`, what a key may do; [`PermissionSet`] (a grant or a
//!   role) and the [`BuiltinRole`]s.
//! - [`CapabilityToken`]: a signed chain handing some of a key's permissions to one other key,
//!   which may delegate a narrower part onwards.
//!
//! Every decoder here takes untrusted bytes and returns a value or a typed error, never
//! panics (property-tested), and checks sizes before allocating.

mod certificate;
mod cluster_key;
mod node_key;
mod permission;
mod record;
mod token;

pub use certificate::{CertificateError, NodeCertificate, NODE_CERTIFICATE_BYTES};
pub use cluster_key::{
    verify_signature, ClusterKey, ClusterKeyParseError, ClusterSecretKey, Context,
};
pub use node_key::{KeyFileError, NodeKey, NODE_KEY_FILE_HEADER};
pub use permission::{
    all_narrow, any_allows, any_allows_range, check_role_name, prefix_end, Action, BuiltinRole,
    Kind, Pattern, Permission, PermissionError, PermissionSet, RoleOrPermission, MAX_PATTERN_BYTES,
    MAX_PERMISSIONS, MAX_ROLE_NAME_BYTES,
};
pub use record::{
    bep44_signable, ClusterRecord, RecordError, RecordMember, SignedRecord, MAX_NAME_BYTES,
    MAX_RECORD_ADDRS_PER_MEMBER, MAX_RECORD_BYTES, MAX_RECORD_MEMBERS, MAX_RELAY_URL_BYTES,
    RECORD_SALT, RECORD_VERSION, SIGNED_RECORD_VERSION,
};
pub use token::{
    CapabilityToken, Link, TokenError, VerifiedToken, BEARER_AUDIENCE, LINK_VERSION, MAX_CHAIN_LEN,
    MAX_TOKEN_BYTES, TOKEN_TEXT_PREFIX, TOKEN_VERSION,
};
