//! Permissions: what a key may do, written `KIND:ACTION:PATTERN` (`kv:write:app/`,
//! `cluster:read:*`).
//!
//! A permission names one kind of resource, the strongest action allowed, and which resources
//! of that kind: `*` (all) or the resources whose name starts with a byte prefix. There is no
//! globbing and no deny: a key may do what some permission it holds allows, so checks are a
//! prefix test and permissions can be compared for delegation ([`Permission::narrows`]).
//!
//! Actions are ordered `read < write < admin`, and a higher action implies the lower ones for
//! the same kind and pattern: `write` lets you read, `admin` lets you write and read.
//!
//! Pattern text: `*` alone is every resource; otherwise the text's UTF-8 bytes are a prefix,
//! and a trailing `*` is accepted and means the same prefix (`app/*` is `app/`). A `*` anywhere
//! else is an error. Bytes that cannot appear raw (`:`, `*`, control characters, invalid
//! UTF-8) are written `\xNN`, and `\` as `\\`; [`fmt::Display`] prints the canonical form,
//! which parses back to the same permission.
//!
//! Stored with postcard: enum variants are tagged by position, so the variants below keep
//! their order and new ones are only ever added at the end. Deserializing checks every bound
//! before allocating and refuses invalid values, like parsing.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest prefix pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Most permissions in one set: a grant, a role, or a capability token link.
pub const MAX_PERMISSIONS: usize = 64;
/// Longest role name, in bytes (role names are ASCII).
pub const MAX_ROLE_NAME_BYTES: usize = 64;

/// What a permission is about. Tags are stable: add variants only at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// Keys of the key-value store.
    Kv,
    /// Automerge documents.
    Doc,
    /// Blobs.
    Blob,
    /// Namespaces.
    Ns,
    /// The cluster itself (membership, grants, status); only with the pattern `*`.
    Cluster,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Kv, Kind::Doc, Kind::Blob, Kind::Ns, Kind::Cluster];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Kv => "kv",
            Kind::Doc => "doc",
            Kind::Blob => "blob",
            Kind::Ns => "ns",
            Kind::Cluster => "cluster",
        }
    }

    /// The binary tag (the variant's position), as in postcard.
    pub(crate) fn tag(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_tag(tag: u8) -> Option<Kind> {
        Kind::ALL.get(usize::from(tag)).copied()
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| PermissionError::UnknownKind(show(s)))
    }
}

/// What may be done. Ordered: a higher action implies the lower ones. Tags are stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    Read,
    /// Implies [`Action::Read`].
    Write,
    /// Implies [`Action::Write`] and [`Action::Read`].
    Admin,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Read, Action::Write, Action::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Write => "write",
            Action::Admin => "admin",
        }
    }

    pub(crate) fn tag(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_tag(tag: u8) -> Option<Action> {
        Action::ALL.get(usize::from(tag)).copied()
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| PermissionError::UnknownAction(show(s)))
    }
}

/// Which resources of a kind: all, or those whose name starts with a prefix.
///
/// A valid prefix is 1..=[`MAX_PATTERN_BYTES`] bytes ([`Pattern::check`]); parsing and
/// deserializing only produce valid patterns. Tags are stable.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "PatternRepr")]
pub enum Pattern {
    /// `*`: every resource of the kind.
    Any,
    /// Every resource whose name starts with these bytes.
    Prefix(Vec<u8>),
}

impl Pattern {
    /// Refuses an empty or over-long prefix.
    pub fn check(&self) -> Result<(), PermissionError> {
        match self {
            Pattern::Any => Ok(()),
            Pattern::Prefix(p) if p.is_empty() => Err(PermissionError::EmptyPattern),
            Pattern::Prefix(p) if p.len() > MAX_PATTERN_BYTES => {
                Err(PermissionError::PatternTooLong { len: p.len() })
            }
            Pattern::Prefix(_) => Ok(()),
        }
    }

    /// Whether `resource` is under this pattern.
    pub fn matches(&self, resource: &[u8]) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(p) => resource.starts_with(p),
        }
    }

    /// Whether every key of the range is under this pattern. Ranges follow etcd: `end` `None`
    /// is just `start`; an empty `end` is every key `>= start`; otherwise `[start, end)`. An
    /// empty or inverted range is covered iff `start` is.
    pub fn covers_range(&self, start: &[u8], end: Option<&[u8]>) -> bool {
        let Pattern::Prefix(p) = self else {
            return true;
        };
        if !start.starts_with(p) {
            return false;
        }
        // The keys with prefix `p` are exactly `[p, prefix_end(p))`, and `start >= p`.
        match end {
            None => true,
            Some([]) => prefix_end(p).is_none(),
            Some(e) if e <= start => true,
            Some(e) => prefix_end(p).is_none_or(|pe| e <= pe.as_slice()),
        }
    }

    /// Whether every resource under `self` is under `parent`.
    pub fn within(&self, parent: &Pattern) -> bool {
        match (self, parent) {
            (_, Pattern::Any) => true,
            (Pattern::Any, Pattern::Prefix(_)) => false,
            (Pattern::Prefix(c), Pattern::Prefix(p)) => c.starts_with(p),
        }
    }
}

/// The smallest byte string greater than every string starting with `prefix`; `None` if there
/// is none (the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let keep = prefix.iter().rposition(|&b| b != 0xff)?;
    let mut end = prefix[..=keep].to_vec();
    end[keep] += 1;
    Some(end)
}

/// Characters a pattern's text never holds raw (written `\xNN`, or `\\` for `\`).
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, ':' | '*' | '\\')
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Pattern::Prefix(p) = self else {
            return f.write_str("*");
        };
        for chunk in p.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\\' {
                    f.write_str("\\\\")?;
                } else if needs_escape(c) {
                    for b in c.encode_utf8(&mut [0; 4]).bytes() {
                        write!(f, "\\x{b:02x}")?;
                    }
                } else {
                    write!(f, "{c}")?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for Pattern {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PermissionError::EmptyPattern);
        }
        if s == "*" {
            return Ok(Pattern::Any);
        }
        let body = s.strip_suffix('*').unwrap_or(s);
        let mut out = Vec::with_capacity(body.len());
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('\\') => out.push(b'\\'),
                    Some('x') => {
                        let hi = chars.next().and_then(|c| c.to_digit(16));
                        let lo = chars.next().and_then(|c| c.to_digit(16));
                        match (hi, lo) {
                            (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
                            _ => return Err(PermissionError::BadEscape(show(s))),
                        }
                    }
                    _ => return Err(PermissionError::BadEscape(show(s))),
                },
                '*' => return Err(PermissionError::MisplacedStar(show(s))),
                c if needs_escape(c) => {
                    return Err(PermissionError::BadChar {
                        pattern: show(s),
                        found: c,
                    })
                }
                c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        let pattern = Pattern::Prefix(out);
        pattern.check()?;
        Ok(pattern)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.check().map_err(serde::ser::Error::custom)?;
        match self {
            Pattern::Any => s.serialize_unit_variant("Pattern", 0, "Any"),
            Pattern::Prefix(p) => s.serialize_newtype_variant("Pattern", 1, "Prefix", p),
        }
    }
}

/// The wire form of [`Pattern`], with the prefix's length bounded before allocating.
#[derive(Deserialize)]
#[serde(rename = "Pattern")]
enum PatternRepr {
    Any,
    Prefix(PatternBytes),
}

struct PatternBytes(Vec<u8>);

impl<'de> Deserialize<'de> for PatternBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(BoundedSeq::<u8>::new(MAX_PATTERN_BYTES))
            .map(PatternBytes)
    }
}

impl TryFrom<PatternRepr> for Pattern {
    type Error = PermissionError;

    fn try_from(r: PatternRepr) -> Result<Self, Self::Error> {
        let pattern = match r {
            PatternRepr::Any => Pattern::Any,
            PatternRepr::Prefix(PatternBytes(p)) => Pattern::Prefix(p),
        };
        pattern.check()?;
        Ok(pattern)
    }
}

/// A sequence of at most `max` elements, refused as soon as it is known to be longer.
struct BoundedSeq<T> {
    max: usize,
    element: PhantomData<T>,
}

impl<T> BoundedSeq<T> {
    fn new(max: usize) -> Self {
        BoundedSeq {
            max,
            element: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedSeq<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at most {} elements", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let hint = seq.size_hint().unwrap_or(0);
        if hint > self.max {
            return Err(de::Error::invalid_length(hint, &self));
        }
        let mut out = Vec::with_capacity(hint);
        while let Some(x) = seq.next_element()? {
            if out.len() == self.max {
                return Err(de::Error::invalid_length(self.max + 1, &self));
            }
            out.push(x);
        }
        Ok(out)
    }
}

/// One permission: `kind`, up to `action`, on the resources under `pattern`.
///
/// Valid ([`Permission::check`]) when the pattern is and a `cluster` permission's pattern is
/// `*`. Parsing and deserializing produce only valid permissions; serializing refuses invalid
/// ones, and [`fmt::Display`] round-trips every valid one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "PermissionRepr")]
pub struct Permission {
    pub kind: Kind,
    pub action: Action,
    pub pattern: Pattern,
}

impl Permission {
    /// A checked permission.
    pub fn new(kind: Kind, action: Action, pattern: Pattern) -> Result<Self, PermissionError> {
        let p = Permission {
            kind,
            action,
            pattern,
        };
        p.check()?;
        Ok(p)
    }

    pub fn check(&self) -> Result<(), PermissionError> {
        self.pattern.check()?;
        if self.kind == Kind::Cluster && self.pattern != Pattern::Any {
            return Err(PermissionError::ClusterPattern(show(
                &self.pattern.to_string(),
            )));
        }
        Ok(())
    }

    /// Whether this permission allows `action` on `resource` of `kind`.
    pub fn allows(&self, kind: Kind, action: Action, resource: &[u8]) -> bool {
        self.kind == kind && action <= self.action && self.pattern.matches(resource)
    }

    /// Whether this permission allows `action` on every key of a range (see
    /// [`Pattern::covers_range`] for the range convention).
    pub fn allows_range(
        &self,
        kind: Kind,
        action: Action,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> bool {
        self.kind == kind && action <= self.action && self.pattern.covers_range(start, end)
    }

    /// Whether `self` grants nothing that `parent` does not: same kind, an action no higher,
    /// and a pattern within the parent's.
    pub fn narrows(&self, parent: &Permission) -> bool {
        self.kind == parent.kind
            && self.action <= parent.action
            && self.pattern.within(&parent.pattern)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.kind, self.action, self.pattern)
    }
}

impl FromStr for Permission {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':');
        let (Some(kind), Some(action), Some(pattern)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(PermissionError::Syntax(show(s)));
        };
        Permission::new(kind.parse()?, action.parse()?, pattern.parse()?)
    }
}

impl Serialize for Permission {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        self.check().map_err(serde::ser::Error::custom)?;
        let mut st = s.serialize_struct("Permission", 3)?;
        st.serialize_field("kind", &self.kind)?;
        st.serialize_field("action", &self.action)?;
        st.serialize_field("pattern", &self.pattern)?;
        st.end()
    }
}

#[derive(Deserialize)]
#[serde(rename = "Permission")]
struct PermissionRepr {
    kind: Kind,
    action: Action,
    pattern: Pattern,
}

impl TryFrom<PermissionRepr> for Permission {
    type Error = PermissionError;

    fn try_from(r: PermissionRepr) -> Result<Self, Self::Error> {
        Permission::new(r.kind, r.action, r.pattern)
    }
}

/// Whether some permission of `perms` allows `action` on `resource` of `kind`.
pub fn any_allows(perms: &[Permission], kind: Kind, action: Action, resource: &[u8]) -> bool {
    perms.iter().any(|p| p.allows(kind, action, resource))
}

/// Whether some single permission of `perms` allows `action` on the whole range. (A range
/// split across two prefixes is refused: ask for each part.)
pub fn any_allows_range(
    perms: &[Permission],
    kind: Kind,
    action: Action,
    start: &[u8],
    end: Option<&[u8]>,
) -> bool {
    perms
        .iter()
        .any(|p| p.allows_range(kind, action, start, end))
}

/// Whether every permission of `child` narrows some permission of `parent`, so `child`
/// grants nothing `parent` does not. (Conservative: a child permission covered only by the
/// union of several parent permissions does not count.)
pub fn all_narrow(child: &[Permission], parent: &[Permission]) -> bool {
    child.iter().all(|c| parent.iter().any(|p| c.narrows(p)))
}

/// At most [`MAX_PERMISSIONS`] valid permissions: a grant or a role. Serialized as a sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PermissionSet(Vec<Permission>);

impl PermissionSet {
    /// Checks the bound and every permission.
    pub fn new(perms: Vec<Permission>) -> Result<Self, PermissionError> {
        if perms.len() > MAX_PERMISSIONS {
            return Err(PermissionError::TooMany { len: perms.len() });
        }
        perms.iter().try_for_each(Permission::check)?;
        Ok(PermissionSet(perms))
    }

    pub fn as_slice(&self) -> &[Permission] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<Permission> {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Permission> {
        self.0.iter()
    }

    /// See [`any_allows`].
    pub fn allows(&self, kind: Kind, action: Action, resource: &[u8]) -> bool {
        any_allows(&self.0, kind, action, resource)
    }

    /// See [`any_allows_range`].
    pub fn allows_range(
        &self,
        kind: Kind,
        action: Action,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> bool {
        any_allows_range(&self.0, kind, action, start, end)
    }

    /// Whether `self` grants nothing `parent` does not (see [`all_narrow`]).
    pub fn narrows(&self, parent: &PermissionSet) -> bool {
        all_narrow(&self.0, &parent.0)
    }
}

impl<'de> Deserialize<'de> for PermissionSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(BoundedSeq::<Permission>::new(MAX_PERMISSIONS))
            .map(PermissionSet)
    }
}

impl<'a> IntoIterator for &'a PermissionSet {
    type Item = &'a Permission;
    type IntoIter = std::slice::Iter<'a, Permission>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The roles every cluster has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BuiltinRole {
    /// `admin` on every kind.
    Admin,
    /// `write` on kv, doc, blob and ns; `cluster:read:*`.
    ReadWrite,
    /// `read` on kv, doc, blob and ns; `cluster:read:*`.
    ReadOnly,
}

impl BuiltinRole {
    pub const ALL: [BuiltinRole; 3] = [
        BuiltinRole::Admin,
        BuiltinRole::ReadWrite,
        BuiltinRole::ReadOnly,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            BuiltinRole::Admin => "admin",
            BuiltinRole::ReadWrite => "readwrite",
            BuiltinRole::ReadOnly => "readonly",
        }
    }

    pub fn permissions(&self) -> Vec<Permission> {
        let all = |kind, action| Permission {
            kind,
            action,
            pattern: Pattern::Any,
        };
        let data = [Kind::Kv, Kind::Doc, Kind::Blob, Kind::Ns];
        match self {
            BuiltinRole::Admin => Kind::ALL.map(|k| all(k, Action::Admin)).to_vec(),
            BuiltinRole::ReadWrite => data
                .map(|k| all(k, Action::Write))
                .into_iter()
                .chain([all(Kind::Cluster, Action::Read)])
                .collect(),
            BuiltinRole::ReadOnly => data
                .map(|k| all(k, Action::Read))
                .into_iter()
                .chain([all(Kind::Cluster, Action::Read)])
                .collect(),
        }
    }
}

impl fmt::Display for BuiltinRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BuiltinRole {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BuiltinRole::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| PermissionError::UnknownRole(show(s)))
    }
}

/// Checks a role name: 1..=[`MAX_ROLE_NAME_BYTES`] characters of `[a-z0-9_-]` (so it can never
/// be mistaken for a permission, which contains `:`).
pub fn check_role_name(name: &str) -> Result<(), PermissionError> {
    let bad = |reason| {
        Err(PermissionError::BadRoleName {
            name: show(name),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_ROLE_NAME_BYTES {
        return bad("it is longer than 64 characters");
    }
    if !name
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
    {
        return bad("only a-z, 0-9, '_' and '-' are allowed");
    }
    Ok(())
}

/// A command-line argument naming a role or a permission: text with a `:` is a permission.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RoleOrPermission {
    Role(String),
    Permission(Permission),
}

impl fmt::Display for RoleOrPermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleOrPermission::Role(r) => f.write_str(r),
            RoleOrPermission::Permission(p) => write!(f, "{p}"),
        }
    }
}

impl FromStr for RoleOrPermission {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            return s.parse().map(RoleOrPermission::Permission);
        }
        check_role_name(s)?;
        Ok(RoleOrPermission::Role(s.to_owned()))
    }
}

/// Untrusted text as shown in an error: at most 64 characters, escaped.
fn show(s: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = s.chars().take(SHOWN).flat_map(char::escape_debug).collect();
    if s.chars().nth(SHOWN).is_some() {
        out.push('…');
    }
    out
}

/// Why a permission, set or role name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionError {
    #[error("permission '{0}' is not KIND:ACTION:PATTERN")]
    Syntax(String),
    #[error("unknown kind '{0}' (expected kv, doc, blob, ns or cluster)")]
    UnknownKind(String),
    #[error("unknown action '{0}' (expected read, write or admin)")]
    UnknownAction(String),
    #[error("empty pattern (use '*' for everything)")]
    EmptyPattern,
    #[error("pattern is {len} bytes; the limit is {MAX_PATTERN_BYTES}")]
    PatternTooLong { len: usize },
    #[error(
        "pattern '{0}': '*' is only allowed alone or at the end (no globbing; write a literal \
         '*' as \\x2a)"
    )]
    MisplacedStar(String),
    #[error("pattern '{pattern}' contains {found:?}; write it as \\xNN")]
    BadChar { pattern: String, found: char },
    #[error("pattern '{0}' has a bad escape (only \\\\ and \\xNN with two hex digits)")]
    BadEscape(String),
    #[error("cluster permissions cover the whole cluster: the pattern must be '*' (found '{0}')")]
    ClusterPattern(String),
    #[error("{len} permissions; the limit is {MAX_PERMISSIONS}")]
    TooMany { len: usize },
    #[error("unknown role '{0}' (built-in roles: admin, readwrite, readonly)")]
    UnknownRole(String),
    #[error("bad role name '{name}': {reason}")]
    BadRoleName { name: String, reason: &'static str },
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn perm(s: &str) -> Permission {
        s.parse().unwrap()
    }

    /// A bounded range end.
    fn s(b: &[u8]) -> Option<&[u8]> {
        Some(b)
    }

    fn prefix(kind: Kind, action: Action, p: &[u8]) -> Permission {
        Permission::new(kind, action, Pattern::Prefix(p.to_vec())).unwrap()
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(
            perm("kv:read:*"),
            Permission::new(Kind::Kv, Action::Read, Pattern::Any).unwrap()
        );
        assert_eq!(
            perm("kv:write:app/*"),
            prefix(Kind::Kv, Action::Write, b"app/")
        );
        assert_eq!(perm("kv:write:app/"), perm("kv:write:app/*"));
        assert_eq!(perm("kv:write:app/*").to_string(), "kv:write:app/");
        assert_eq!(
            perm("doc:admin:caf\u{e9}").to_string(),
            "doc:admin:caf\u{e9}"
        );
        assert_eq!(perm("blob:read:a b").to_string(), "blob:read:a b");
        assert_eq!(perm("cluster:admin:*").to_string(), "cluster:admin:*");
        assert_eq!(perm("ns:read:\\x3a"), prefix(Kind::Ns, Action::Read, b":"));
        assert_eq!(perm("ns:read:\\\\*"), prefix(Kind::Ns, Action::Read, b"\\"));
        assert_eq!(perm("ns:read:\\x2A"), prefix(Kind::Ns, Action::Read, b"*"));
        assert_eq!(
            perm("kv:read:\\xff\\x00"),
            prefix(Kind::Kv, Action::Read, &[0xff, 0])
        );
    }

    #[test]
    fn display_escapes_what_text_cannot_hold() {
        let p = prefix(
            Kind::Kv,
            Action::Read,
            &[0xff, b':', b'a', b'*', b'\\', b'\n', 0xc3],
        );
        let text = p.to_string();
        assert_eq!(text, "kv:read:\\xff\\x3aa\\x2a\\\\\\x0a\\xc3");
        assert_eq!(perm(&text), p);
        // A trailing '*' byte stays a byte, not the "same prefix" star.
        assert_eq!(
            prefix(Kind::Kv, Action::Read, b"a*").to_string(),
            "kv:read:a\\x2a"
        );
    }

    #[test]
    fn errors_name_the_bad_part() {
        let err = |s: &str| s.parse::<Permission>().unwrap_err();
        assert_eq!(
            err("kvv:read:*").to_string(),
            "unknown kind 'kvv' (expected kv, doc, blob, ns or cluster)"
        );
        assert_eq!(
            err("kv:reed:*").to_string(),
            "unknown action 'reed' (expected read, write or admin)"
        );
        assert_eq!(err("kv:read"), PermissionError::Syntax("kv:read".into()));
        assert_eq!(err("kv"), PermissionError::Syntax("kv".into()));
        assert_eq!(err("kv:read:"), PermissionError::EmptyPattern);
        assert_eq!(err("KV:read:*"), PermissionError::UnknownKind("KV".into()));
        assert_eq!(
            err("kv:read:a*b"),
            PermissionError::MisplacedStar("a*b".into())
        );
        assert_eq!(
            err("kv:read:**"),
            PermissionError::MisplacedStar("**".into())
        );
        assert_eq!(
            err("kv:read:*a"),
            PermissionError::MisplacedStar("*a".into())
        );
        assert_eq!(
            err("kv:read:a:b"),
            PermissionError::BadChar {
                pattern: "a:b".into(),
                found: ':'
            }
        );
        assert!(matches!(
            err("kv:read:a\tb"),
            PermissionError::BadChar { found: '\t', .. }
        ));
        for bad in ["\\", "\\*", "\\q", "\\x4", "\\x4g", "a\\"] {
            assert!(
                matches!(
                    err(&format!("kv:read:{bad}")),
                    PermissionError::BadEscape(_)
                ),
                "{bad}"
            );
        }
        assert_eq!(
            err("cluster:read:x").to_string(),
            "cluster permissions cover the whole cluster: the pattern must be '*' (found 'x')"
        );
        assert!(matches!(
            err("cluster:read:x*"),
            PermissionError::ClusterPattern(_)
        ));
        let long = "a".repeat(MAX_PATTERN_BYTES);
        perm(&format!("kv:read:{long}"));
        perm(&format!("kv:read:{long}*"));
        assert_eq!(
            err(&format!("kv:read:{long}a")),
            PermissionError::PatternTooLong {
                len: MAX_PATTERN_BYTES + 1
            }
        );
        // Untrusted text in errors is bounded and escaped.
        let shown = err(&format!("{}\n:read:*", "k".repeat(1000))).to_string();
        assert!(shown.len() < 200, "{shown}");
    }

    #[test]
    fn higher_actions_imply_lower_ones() {
        let write = perm("kv:write:app/");
        assert!(write.allows(Kind::Kv, Action::Read, b"app/x"));
        assert!(write.allows(Kind::Kv, Action::Write, b"app/"));
        assert!(!write.allows(Kind::Kv, Action::Admin, b"app/x"));
        assert!(!write.allows(Kind::Kv, Action::Read, b"ap"));
        assert!(!write.allows(Kind::Doc, Action::Read, b"app/x"));
        let admin = perm("cluster:admin:*");
        for action in Action::ALL {
            assert!(admin.allows(Kind::Cluster, action, b""));
        }
        assert!(Action::Read < Action::Write && Action::Write < Action::Admin);
    }

    #[test]
    fn prefix_end_examples() {
        assert_eq!(prefix_end(b"a"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"a\xfe\xff"), Some(b"a\xff".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn range_examples() {
        let p = perm("kv:read:app/");
        let r =
            |start: &[u8], end: Option<&[u8]>| p.allows_range(Kind::Kv, Action::Read, start, end);
        assert!(r(b"app/x", None));
        assert!(!r(b"apq", None));
        assert!(r(b"app/", s(b"app0"))); // "app0" is the prefix's end
        assert!(!r(b"app/", s(b"app0\0")));
        assert!(r(b"app/a", s(b"app/b")));
        assert!(!r(b"app/a", s(b"")));
        assert!(!r(b"ap", s(b"app/b")));
        // Empty and inverted ranges: covered iff the start is.
        assert!(r(b"app/b", s(b"app/a")));
        assert!(!r(b"app/b", s(b"zzz")));
        assert!(!r(b"apq", s(b"apa")));
        // An all-0xff prefix reaches the end of the key space.
        let top = prefix(Kind::Kv, Action::Read, b"\xff");
        assert!(top.allows_range(Kind::Kv, Action::Read, b"\xff", s(b"")));
        assert!(!top.allows_range(Kind::Kv, Action::Read, b"\xfe", s(b"")));
        assert!(perm("kv:read:*").allows_range(Kind::Kv, Action::Read, b"", s(b"")));
        assert!(!perm("kv:read:*").allows_range(Kind::Kv, Action::Write, b"", s(b"")));
    }

    #[test]
    fn narrowing_examples() {
        let parent = perm("kv:write:app/");
        assert!(perm("kv:write:app/").narrows(&parent));
        assert!(perm("kv:read:app/x").narrows(&parent));
        assert!(!perm("kv:admin:app/x").narrows(&parent));
        assert!(!perm("kv:read:ap").narrows(&parent));
        assert!(!perm("kv:read:*").narrows(&parent));
        assert!(!perm("doc:read:app/").narrows(&parent));
        assert!(perm("kv:read:x").narrows(&perm("kv:read:*")));
        assert!(perm("kv:read:*").narrows(&perm("kv:admin:*")));

        let parents = PermissionSet::new(vec![perm("kv:write:a"), perm("doc:read:*")]).unwrap();
        let ok = PermissionSet::new(vec![perm("kv:read:ab"), perm("doc:read:x")]).unwrap();
        let wide = PermissionSet::new(vec![perm("kv:read:ab"), perm("doc:write:x")]).unwrap();
        assert!(ok.narrows(&parents));
        assert!(!wide.narrows(&parents));
        assert!(PermissionSet::default().narrows(&parents));
        assert!(parents.allows(Kind::Doc, Action::Read, b"q"));
        assert!(!parents.allows(Kind::Doc, Action::Write, b"q"));
        assert!(parents.allows_range(Kind::Kv, Action::Write, b"a", s(b"b")));
        assert!(!parents.allows_range(Kind::Kv, Action::Write, b"a", s(b"b\0")));
    }

    #[test]
    fn sets_are_bounded_and_checked() {
        let many = vec![perm("kv:read:*"); MAX_PERMISSIONS + 1];
        assert_eq!(
            PermissionSet::new(many.clone()),
            Err(PermissionError::TooMany {
                len: MAX_PERMISSIONS + 1
            })
        );
        PermissionSet::new(many[..MAX_PERMISSIONS].to_vec()).unwrap();
        let invalid = Permission {
            kind: Kind::Cluster,
            action: Action::Read,
            pattern: Pattern::Prefix(b"x".to_vec()),
        };
        assert!(matches!(
            PermissionSet::new(vec![invalid]),
            Err(PermissionError::ClusterPattern(_))
        ));
    }

    #[test]
    fn builtin_roles() {
        let names: Vec<_> = BuiltinRole::ALL.iter().map(|r| r.to_string()).collect();
        assert_eq!(names, ["admin", "readwrite", "readonly"]);
        for r in BuiltinRole::ALL {
            assert_eq!(r.name().parse::<BuiltinRole>(), Ok(r));
            check_role_name(r.name()).unwrap();
            PermissionSet::new(r.permissions()).unwrap();
        }
        let texts = |r: BuiltinRole| -> Vec<String> {
            r.permissions().iter().map(|p| p.to_string()).collect()
        };
        assert_eq!(
            texts(BuiltinRole::Admin),
            [
                "kv:admin:*",
                "doc:admin:*",
                "blob:admin:*",
                "ns:admin:*",
                "cluster:admin:*"
            ]
        );
        assert_eq!(
            texts(BuiltinRole::ReadWrite),
            [
                "kv:write:*",
                "doc:write:*",
                "blob:write:*",
                "ns:write:*",
                "cluster:read:*"
            ]
        );
        assert_eq!(
            texts(BuiltinRole::ReadOnly),
            [
                "kv:read:*",
                "doc:read:*",
                "blob:read:*",
                "ns:read:*",
                "cluster:read:*"
            ]
        );
        assert!(all_narrow(
            &BuiltinRole::ReadOnly.permissions(),
            &BuiltinRole::ReadWrite.permissions()
        ));
        assert!(all_narrow(
            &BuiltinRole::ReadWrite.permissions(),
            &BuiltinRole::Admin.permissions()
        ));
        assert!(!all_narrow(
            &BuiltinRole::Admin.permissions(),
            &BuiltinRole::ReadWrite.permissions()
        ));
        assert!(matches!(
            "root".parse::<BuiltinRole>(),
            Err(PermissionError::UnknownRole(_))
        ));
    }

    #[test]
    fn role_names_and_cli_arguments() {
        check_role_name("ops_team-2").unwrap();
        check_role_name(&"a".repeat(MAX_ROLE_NAME_BYTES)).unwrap();
        for bad in [
            "",
            "Ops",
            "a b",
            "a:b",
            "é",
            &"a".repeat(MAX_ROLE_NAME_BYTES + 1),
        ] {
            assert!(
                matches!(
                    check_role_name(bad),
                    Err(PermissionError::BadRoleName { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            "readonly".parse::<RoleOrPermission>(),
            Ok(RoleOrPermission::Role("readonly".into()))
        );
        assert_eq!(
            "kv:read:a".parse::<RoleOrPermission>(),
            Ok(RoleOrPermission::Permission(perm("kv:read:a")))
        );
        assert!(matches!(
            "kv:rd:a".parse::<RoleOrPermission>(),
            Err(PermissionError::UnknownAction(_))
        ));
        assert!(matches!(
            "Admin".parse::<RoleOrPermission>(),
            Err(PermissionError::BadRoleName { .. })
        ));
        assert_eq!(
            "kv:read:a*"
                .parse::<RoleOrPermission>()
                .unwrap()
                .to_string(),
            "kv:read:a"
        );
    }

    #[test]
    fn golden_postcard_bytes() {
        let cases: [(&str, &[u8]); 3] = [
            ("kv:read:*", &[0, 0, 0]),
            ("kv:write:app/", &[0, 1, 1, 4, b'a', b'p', b'p', b'/']),
            ("cluster:admin:*", &[4, 2, 0]),
        ];
        for (text, bytes) in cases {
            assert_eq!(postcard::to_allocvec(&perm(text)).unwrap(), bytes, "{text}");
            assert_eq!(
                postcard::from_bytes::<Permission>(bytes).unwrap(),
                perm(text)
            );
        }
        let set = PermissionSet::new(vec![perm("kv:read:*"), perm("cluster:admin:*")]).unwrap();
        assert_eq!(postcard::to_allocvec(&set).unwrap(), [2, 0, 0, 0, 4, 2, 0]);
    }

    #[test]
    fn postcard_refuses_invalid_values() {
        // cluster with a prefix; an empty prefix; unknown tags.
        for bytes in [
            &[4u8, 0, 1, 1, b'x'][..],
            &[0, 0, 1, 0],
            &[5, 0, 0],
            &[0, 3, 0],
            &[0, 0, 2],
        ] {
            assert!(
                postcard::from_bytes::<Permission>(bytes).is_err(),
                "{bytes:?}"
            );
        }
        // A prefix over the limit, refused from its length alone.
        let mut long = vec![0u8, 0, 1];
        long.extend_from_slice(&[0x81, 0x08]); // varint 1025
        assert!(postcard::from_bytes::<Permission>(&long).is_err());
        // A set over the limit, refused from its length alone.
        assert!(postcard::from_bytes::<PermissionSet>(&[65]).is_err());
        let mut set = vec![65u8];
        for _ in 0..65 {
            set.extend_from_slice(&[0, 0, 0]);
        }
        assert!(postcard::from_bytes::<PermissionSet>(&set).is_err());
        // Serializing an invalid permission fails instead of storing it.
        let invalid = Permission {
            kind: Kind::Kv,
            action: Action::Read,
            pattern: Pattern::Prefix(vec![]),
        };
        assert!(postcard::to_allocvec(&invalid).is_err());
    }

    pub(crate) fn arb_permission() -> impl Strategy<Value = Permission> {
        let byte = prop_oneof![
            any::<u8>(),
            Just(b':'),
            Just(b'*'),
            Just(b'\\'),
            Just(b'x'),
            Just(0xff),
        ];
        let pattern = prop_oneof![
            1 => Just(Pattern::Any),
            4 => proptest::collection::vec(byte, 1..24).prop_map(Pattern::Prefix),
            1 => proptest::collection::vec(any::<u8>(), 1..=MAX_PATTERN_BYTES)
                .prop_map(Pattern::Prefix),
        ];
        (0..5u8, 0..3u8, pattern).prop_map(|(k, a, pattern)| {
            let kind = Kind::from_tag(k).unwrap();
            Permission {
                kind,
                action: Action::from_tag(a).unwrap(),
                pattern: if kind == Kind::Cluster {
                    Pattern::Any
                } else {
                    pattern
                },
            }
        })
    }

    /// Strings of length 0..=4 over the alphabet the range test uses, plus each symbol + 1.
    fn candidate_keys() -> Vec<Vec<u8>> {
        const SYMBOLS: [u8; 7] = [0x00, 0x01, 0x02, 0x61, 0x62, 0xfe, 0xff];
        let mut all = vec![vec![]];
        let mut last = vec![vec![]];
        for _ in 0..4 {
            last = last
                .iter()
                .flat_map(|k: &Vec<u8>| {
                    SYMBOLS.iter().map(move |&s| {
                        let mut k = k.clone();
                        k.push(s);
                        k
                    })
                })
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    fn short_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop::sample::select(vec![0x00u8, 0x01, 0xfe, 0xff, b'a']),
            0..4,
        )
    }

    proptest! {
        #[test]
        fn text_round_trips(p in arb_permission()) {
            let text = p.to_string();
            prop_assert_eq!(text.parse::<Permission>().unwrap(), p.clone());
            // And the canonical text is a fixed point.
            prop_assert_eq!(text.parse::<Permission>().unwrap().to_string(), text);
        }

        #[test]
        fn postcard_round_trips(p in arb_permission()) {
            let bytes = postcard::to_allocvec(&p).unwrap();
            prop_assert_eq!(postcard::from_bytes::<Permission>(&bytes).unwrap(), p);
        }

        #[test]
        fn parsing_never_panics(s in ".{0,80}", t in "[a-z:*\\\\x0-9a-f\t]{0,40}") {
            let _ = s.parse::<Permission>();
            let _ = s.parse::<RoleOrPermission>();
            if let Ok(p) = t.parse::<Permission>() {
                prop_assert_eq!(p.to_string().parse::<Permission>().unwrap(), p);
            }
        }

        #[test]
        fn postcard_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = postcard::from_bytes::<Permission>(&bytes) {
                prop_assert!(p.check().is_ok());
            }
            let _ = postcard::from_bytes::<PermissionSet>(&bytes);
        }

        /// `allows_range` against the definition: the range's keys all start with the prefix.
        /// A counterexample `k` (in range, without the prefix) can always be shortened to one
        /// of the candidate keys: with `i` the first index where `k` leaves the prefix `p`,
        /// `k >= start >= p` forces `k[i] > p[i]`, and `p[..i] + [p[i] + 1]` is also in range
        /// (between `start` and `k`) and lacks the prefix.
        #[test]
        fn allows_range_matches_brute_force(
            p in short_bytes().prop_filter("non-empty", |p| !p.is_empty()),
            start in short_bytes(),
            end in prop_oneof![Just(None), short_bytes().prop_map(Some)],
            prefix_start in any::<bool>(),
        ) {
            // Half the time, make `start` extend the prefix so the interesting cases come up.
            let start = if prefix_start { [p.clone(), start].concat() } else { start };
            let perm = prefix(Kind::Kv, Action::Read, &p);
            let in_range = |k: &[u8]| match end.as_deref() {
                None => k == start.as_slice(),
                Some([]) => k >= start.as_slice(),
                Some(e) => k >= start.as_slice() && k < e,
            };
            let model = start.starts_with(&p)
                && candidate_keys().iter().all(|k| !in_range(k) || k.starts_with(&p));
            prop_assert_eq!(
                perm.allows_range(Kind::Kv, Action::Read, &start, end.as_deref()),
                model
            );
            prop_assert!(Permission::new(Kind::Kv, Action::Read, Pattern::Any)
                .unwrap()
                .allows_range(Kind::Kv, Action::Read, &start, end.as_deref()));
        }

        #[test]
        fn narrowing_is_sound(child in arb_permission(), parent in arb_permission(), r in proptest::collection::vec(any::<u8>(), 0..8)) {
            // If the child narrows the parent, everything the child allows the parent allows.
            if child.narrows(&parent) {
                for action in Action::ALL {
                    let resource = match &child.pattern {
                        Pattern::Any => r.clone(),
                        Pattern::Prefix(p) => [p.clone(), r.clone()].concat(),
                    };
                    if child.allows(child.kind, action, &resource) {
                        prop_assert!(parent.allows(child.kind, action, &resource));
                    }
                }
            }
            prop_assert!(child.narrows(&child));
        }
    }
}
