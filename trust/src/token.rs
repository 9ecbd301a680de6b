//! Capability tokens: a key that holds permissions (in the cluster's grants) hands some of them
//! to one other key, the audience.
//!
//! Not a bearer token: a node accepts a token only from its audience, proven by the key of the
//! QUIC connection presenting it, so a leaked token is useless to anyone else. The audience may
//! delegate: issue a narrower token to another key, chained to the one it holds. A chain has at
//! most [`MAX_CHAIN_LEN`] links (the root and three delegations).
//!
//! The one exception is a root token addressed to [`BEARER_AUDIENCE`]: callers that cannot
//! prove a key (a browser page on the automerge-repo WebSocket listener, an etcd client on
//! the etcd API) present it, and whoever holds it may use it there. No key can prove to be the bearer audience over QUIC,
//! so such a token is refused on the client protocol, and it cannot be delegated (nobody can
//! sign as its audience). Keep such tokens narrow and short-lived.
//!
//! What a token allows: the node verifies it ([`CapabilityToken::verify`]), then allows a
//! request only if the leaf's permissions allow it AND the root issuer's own grants allow it at
//! that moment. So a token never gives more than its root issuer holds now: taking a grant from
//! the issuer takes it from every token the issuer handed out. Each delegation can only narrow
//! (checked at every link, in both [`CapabilityToken::delegate`] and `verify`), and every
//! link's validity window must contain the current time.
//!
//! Chaining and revocation: the token made of the links `..=i` is what link `i`'s audience was
//! given; its BLAKE3 hash (of the encoding below) names it ([`CapabilityToken::link_hashes`]).
//! Link `i > 0` carries its parent's hash, the hash of the token made of links `..i`
//! (signatures included), inside the bytes its issuer signs, and its issuer must be link
//! `i - 1`'s audience. So a link cannot be moved to another chain, and a chain cannot be cut,
//! reordered or extended by anyone but the current audience. Revoking a hash revokes that token
//! and everything delegated from it.
//!
//! Encoding (integers big-endian), at most [`MAX_TOKEN_BYTES`]:
//!
//! ```text
//! token:
//!   version       u8 = TOKEN_VERSION (1)
//!   links         u8 count (1..=MAX_CHAIN_LEN), then each link, root first
//! link:
//!   version       u8 = LINK_VERSION (1)
//!   issuer        32 bytes (Ed25519 public key)
//!   audience      32 bytes (Ed25519 public key: an iroh endpoint id)
//!   permissions   u8 count (1..=MAX_PERMISSIONS), then per permission:
//!     kind        u8 (0 kv, 1 doc, 2 blob, 3 ns, 4 cluster)
//!     action      u8 (0 read, 1 write, 2 admin)
//!     pattern     u16 length (0: `*`; else 1..=MAX_PATTERN_BYTES), then the prefix bytes
//!   not_before    u64 Unix seconds
//!   expires_at    u64 Unix seconds, > not_before
//!   nonce         16 bytes
//!   parent        u8 0 (root), or 1 then the parent's 32-byte hash
//!   signature     64 bytes: Ed25519 by the issuer over
//!                 `aspen/capability-token/v1 || the link's bytes before the signature`
//! ```
//!
//! Decoding is strict: every count and length is checked before allocating, nothing trails,
//! and whatever decodes re-encodes to the same bytes. Text form (command lines, environment
//! variables): [`TOKEN_TEXT_PREFIX`] followed by the bytes in lowercase hex.

use std::fmt;
use std::str::FromStr;

use crate::cluster_key::{verify_signature, Context};
use crate::node_key::NodeKey;
use crate::permission::{
    all_narrow, Action, Kind, Pattern, Permission, PermissionError, MAX_PATTERN_BYTES,
    MAX_PERMISSIONS,
};

/// Most links in a chain: the root and three delegations.
pub const MAX_CHAIN_LEN: usize = 4;
/// Largest encoded token.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Version byte of the token framing.
pub const TOKEN_VERSION: u8 = 1;
/// Version byte of each link.
pub const LINK_VERSION: u8 = 1;
/// What a token's text form starts with.
pub const TOKEN_TEXT_PREFIX: &str = "aspen-token-v1:";
/// The audience of a bearer token: 32 zero bytes, which is no key anyone holds the secret of
/// (and not a usable Ed25519 key: it encodes a point of small order).
pub const BEARER_AUDIENCE: [u8; 32] = [0; 32];

/// One signed step of a chain: `issuer` hands `permissions` to `audience` for
/// `[not_before, expires_at)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub issuer: [u8; 32],
    pub audience: [u8; 32],
    pub permissions: Vec<Permission>,
    /// Unix seconds from which the link is valid.
    pub not_before: u64,
    /// Unix seconds from which the link is no longer valid.
    pub expires_at: u64,
    /// Makes every issued link distinct (and so its hash, for revocation).
    pub nonce: [u8; 16],
    /// The hash of the token the issuer held (links before this one); `None` for the root.
    pub parent: Option<[u8; 32]>,
    pub signature: [u8; 64],
}

impl Link {
    /// Builds and signs a link; the caller has checked its fields.
    fn sign(
        issuer: &NodeKey,
        audience: [u8; 32],
        permissions: Vec<Permission>,
        not_before: u64,
        expires_at: u64,
        nonce: [u8; 16],
        parent: Option<[u8; 32]>,
    ) -> Link {
        let mut link = Link {
            issuer: issuer.public(),
            audience,
            permissions,
            not_before,
            expires_at,
            nonce,
            parent,
            signature: [0; 64],
        };
        link.signature = issuer.sign(Context::CapabilityToken, &link.signed_bytes());
        link
    }

    /// The bytes the issuer signs (after the context label): the link's encoding without the
    /// signature.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_signed_part(&mut out);
        out
    }

    fn encoded_len(&self) -> usize {
        let permissions: usize = self
            .permissions
            .iter()
            .map(|p| {
                4 + match &p.pattern {
                    Pattern::Any => 0,
                    Pattern::Prefix(b) => b.len(),
                }
            })
            .sum();
        1 + 32 + 32 + 1 + permissions + 8 + 8 + 16 + 1 + self.parent.map_or(0, |_| 32) + 64
    }

    fn encode_signed_part(&self, out: &mut Vec<u8>) {
        out.push(LINK_VERSION);
        out.extend_from_slice(&self.issuer);
        out.extend_from_slice(&self.audience);
        out.push(self.permissions.len() as u8);
        for p in &self.permissions {
            out.push(p.kind.tag());
            out.push(p.action.tag());
            match &p.pattern {
                Pattern::Any => out.extend_from_slice(&0u16.to_be_bytes()),
                Pattern::Prefix(b) => {
                    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        match &self.parent {
            None => out.push(0),
            Some(h) => {
                out.push(1);
                out.extend_from_slice(h);
            }
        }
    }

    fn decode(r: &mut Reader<'_>, link: usize) -> Result<Link, TokenError> {
        let bad = |what: String| TokenError::Decode(format!("link {link}: {what}"));
        let version = r.u8()?;
        if version != LINK_VERSION {
            return Err(bad(format!("unsupported link version {version}")));
        }
        let issuer = r.array::<32>()?;
        let audience = r.array::<32>()?;
        let count = usize::from(r.u8()?);
        if count == 0 {
            return Err(TokenError::Empty);
        }
        if count > MAX_PERMISSIONS {
            return Err(PermissionError::TooMany { len: count }.into());
        }
        let mut permissions = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = r.u8()?;
            let kind = Kind::from_tag(kind).ok_or_else(|| bad(format!("unknown kind {kind}")))?;
            let action = r.u8()?;
            let action =
                Action::from_tag(action).ok_or_else(|| bad(format!("unknown action {action}")))?;
            let len = usize::from(r.u16()?);
            let pattern = match len {
                0 => Pattern::Any,
                1..=MAX_PATTERN_BYTES => Pattern::Prefix(r.take(len)?.to_vec()),
                _ => return Err(PermissionError::PatternTooLong { len }.into()),
            };
            permissions.push(Permission::new(kind, action, pattern)?);
        }
        let not_before = r.u64()?;
        let expires_at = r.u64()?;
        if expires_at <= not_before {
            return Err(TokenError::EmptyWindow {
                not_before,
                expires_at,
            });
        }
        let nonce = r.array::<16>()?;
        let parent = match r.u8()? {
            0 => None,
            1 => Some(r.array::<32>()?),
            other => return Err(bad(format!("parent flag {other} (expected 0 or 1)"))),
        };
        let signature = r.array::<64>()?;
        Ok(Link {
            issuer,
            audience,
            permissions,
            not_before,
            expires_at,
            nonce,
            parent,
            signature,
        })
    }
}

/// A chain of links, root first. Only built by [`Self::issue`], [`Self::delegate`] and
/// [`Self::decode`], which keep it within every bound; trust it only after [`Self::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapabilityToken {
    links: Vec<Link>,
}

/// What a verified token lets its presenter do (before intersecting with the root issuer's
/// grants, which the caller must do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The key whose grants bound the token.
    pub root_issuer: [u8; 32],
    /// The leaf's permissions.
    pub permissions: Vec<Permission>,
    /// The earliest expiry of any link (Unix seconds).
    pub expires_at: u64,
    /// [`CapabilityToken::link_hashes`].
    pub hashes: Vec<[u8; 32]>,
}

impl CapabilityToken {
    /// A root token: `issuer` hands `permissions` to `audience` for `[not_before, expires_at)`.
    pub fn issue(
        issuer: &NodeKey,
        audience: [u8; 32],
        permissions: Vec<Permission>,
        not_before: u64,
        expires_at: u64,
        nonce: [u8; 16],
    ) -> Result<Self, TokenError> {
        check_fields(&permissions, not_before, expires_at)?;
        let link = Link::sign(
            issuer,
            audience,
            permissions,
            not_before,
            expires_at,
            nonce,
            None,
        );
        CapabilityToken::bounded(vec![link])
    }

    /// A token from `holder` (this token's audience) to `audience`, granting a narrowing of
    /// this token's permissions within its validity window. Does not verify `self`: the node
    /// that receives the result does.
    pub fn delegate(
        &self,
        holder: &NodeKey,
        audience: [u8; 32],
        permissions: Vec<Permission>,
        not_before: u64,
        expires_at: u64,
        nonce: [u8; 16],
    ) -> Result<Self, TokenError> {
        let leaf = self.leaf();
        if holder.public() != leaf.audience {
            return Err(TokenError::NotHolder);
        }
        let len = self.links.len() + 1;
        if len > MAX_CHAIN_LEN {
            return Err(TokenError::TooDeep {
                len,
                max: MAX_CHAIN_LEN,
            });
        }
        check_fields(&permissions, not_before, expires_at)?;
        if not_before < leaf.not_before || expires_at > leaf.expires_at {
            return Err(TokenError::WindowNotInParent {
                not_before,
                expires_at,
                parent_not_before: leaf.not_before,
                parent_expires_at: leaf.expires_at,
            });
        }
        if let Some(p) = widened(&permissions, &leaf.permissions) {
            return Err(TokenError::Widened {
                link: self.links.len(),
                permission: p.to_string(),
            });
        }
        let link = Link::sign(
            holder,
            audience,
            permissions,
            not_before,
            expires_at,
            nonce,
            Some(self.hash()),
        );
        let mut links = self.links.clone();
        links.push(link);
        CapabilityToken::bounded(links)
    }

    fn bounded(links: Vec<Link>) -> Result<Self, TokenError> {
        let token = CapabilityToken { links };
        let len = token.encoded_len();
        if len > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge {
                len,
                max: MAX_TOKEN_BYTES,
            });
        }
        Ok(token)
    }

    /// The links, root first (never empty).
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// The last link: whom the token is for and what it grants.
    pub fn leaf(&self) -> &Link {
        self.links.last().expect("a token has at least one link")
    }

    /// The key whose grants bound the token.
    pub fn root_issuer(&self) -> [u8; 32] {
        self.links[0].issuer
    }

    /// The key the token is for (only it can use the token).
    pub fn audience(&self) -> [u8; 32] {
        self.leaf().audience
    }

    /// BLAKE3 of [`Self::encode`]: the name to revoke this token by.
    pub fn hash(&self) -> [u8; 32] {
        chain_hash(&self.links)
    }

    /// For each link `i`, the hash of the token made of links `..=i` (the token that link's
    /// audience was given). The last is [`Self::hash`].
    pub fn link_hashes(&self) -> Vec<[u8; 32]> {
        (1..=self.links.len())
            .map(|n| chain_hash(&self.links[..n]))
            .collect()
    }

    fn encoded_len(&self) -> usize {
        2 + self.links.iter().map(Link::encoded_len).sum::<usize>()
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_chain(&self.links)
    }

    /// Decodes strictly (does not verify: call [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, TokenError> {
        if bytes.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge {
                len: bytes.len(),
                max: MAX_TOKEN_BYTES,
            });
        }
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != TOKEN_VERSION {
            return Err(TokenError::Decode(format!(
                "unsupported token version {version}"
            )));
        }
        let count = usize::from(r.u8()?);
        if count == 0 {
            return Err(TokenError::Decode("the token has no links".into()));
        }
        if count > MAX_CHAIN_LEN {
            return Err(TokenError::TooDeep {
                len: count,
                max: MAX_CHAIN_LEN,
            });
        }
        let mut links = Vec::with_capacity(count);
        for i in 0..count {
            links.push(Link::decode(&mut r, i)?);
        }
        if !r.0.is_empty() {
            return Err(TokenError::Decode(format!(
                "{} unexpected trailing bytes",
                r.0.len()
            )));
        }
        Ok(CapabilityToken { links })
    }

    /// Checks that the token lets `presenter` (the key of the connection presenting it) act at
    /// `now` (Unix seconds): every signature is valid, each link chains to the one before and
    /// narrows it, every link is valid at `now`, no link's hash is revoked, and the leaf is for
    /// `presenter`. The caller must still check the root issuer's grants (module doc).
    pub fn verify(
        &self,
        presenter: &[u8; 32],
        now: u64,
        is_revoked: impl Fn(&[u8; 32]) -> bool,
    ) -> Result<VerifiedToken, TokenError> {
        let links = &self.links;
        if links.len() > MAX_CHAIN_LEN {
            return Err(TokenError::TooDeep {
                len: links.len(),
                max: MAX_CHAIN_LEN,
            });
        }
        let hashes = self.link_hashes();
        for (i, link) in links.iter().enumerate() {
            let (parent, prev) = match i.checked_sub(1) {
                None => (None, None),
                Some(p) => (Some(hashes[p]), Some(&links[p])),
            };
            if link.parent != parent || prev.is_some_and(|prev| prev.audience != link.issuer) {
                return Err(TokenError::BrokenChain { link: i });
            }
            if !verify_signature(
                &link.issuer,
                Context::CapabilityToken,
                &link.signed_bytes(),
                &link.signature,
            ) {
                return Err(TokenError::BadSignature { link: i });
            }
            if let Some(p) = prev.and_then(|prev| widened(&link.permissions, &prev.permissions)) {
                return Err(TokenError::Widened {
                    link: i,
                    permission: p.to_string(),
                });
            }
        }
        if let Some(link) = hashes.iter().position(&is_revoked) {
            return Err(TokenError::Revoked { link });
        }
        for link in links {
            if now < link.not_before {
                return Err(TokenError::NotYetValid {
                    not_before: link.not_before,
                    now,
                });
            }
            if now >= link.expires_at {
                return Err(TokenError::Expired {
                    expires_at: link.expires_at,
                    now,
                });
            }
        }
        if self.audience() != *presenter {
            return Err(TokenError::WrongAudience);
        }
        Ok(VerifiedToken {
            root_issuer: self.root_issuer(),
            permissions: self.leaf().permissions.clone(),
            expires_at: links.iter().map(|l| l.expires_at).min().unwrap_or(0),
            hashes,
        })
    }

    /// A chain as given, unchecked: for tests that forge what `delegate` refuses to build.
    #[cfg(test)]
    fn from_links_unchecked(links: Vec<Link>) -> Self {
        CapabilityToken { links }
    }
}

/// The first of `child` that narrows none of `parent`.
fn widened<'a>(child: &'a [Permission], parent: &[Permission]) -> Option<&'a Permission> {
    child
        .iter()
        .find(|c| !all_narrow(std::slice::from_ref(c), parent))
}

fn check_fields(
    permissions: &[Permission],
    not_before: u64,
    expires_at: u64,
) -> Result<(), TokenError> {
    if permissions.is_empty() {
        return Err(TokenError::Empty);
    }
    if permissions.len() > MAX_PERMISSIONS {
        return Err(PermissionError::TooMany {
            len: permissions.len(),
        }
        .into());
    }
    permissions.iter().try_for_each(Permission::check)?;
    if expires_at <= not_before {
        return Err(TokenError::EmptyWindow {
            not_before,
            expires_at,
        });
    }
    Ok(())
}

fn encode_chain(links: &[Link]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + links.iter().map(Link::encoded_len).sum::<usize>());
    out.push(TOKEN_VERSION);
    out.push(links.len() as u8);
    for link in links {
        link.encode_signed_part(&mut out);
        out.extend_from_slice(&link.signature);
    }
    out
}

fn chain_hash(links: &[Link]) -> [u8; 32] {
    *blake3::hash(&encode_chain(links)).as_bytes()
}

impl fmt::Display for CapabilityToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_TEXT_PREFIX}{}", hex::encode(self.encode()))
    }
}

impl FromStr for CapabilityToken {
    type Err = TokenError;

    /// Parses the text form; surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_digits = s.trim().strip_prefix(TOKEN_TEXT_PREFIX).ok_or_else(|| {
            TokenError::Decode(format!(
                "token text does not start with '{TOKEN_TEXT_PREFIX}'"
            ))
        })?;
        if hex_digits.len() > 2 * MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge {
                len: hex_digits.len() / 2,
                max: MAX_TOKEN_BYTES,
            });
        }
        if !hex_digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(TokenError::Decode(
                "token text after the prefix is not lowercase hex".into(),
            ));
        }
        let bytes = hex::decode(hex_digits)
            .map_err(|_| TokenError::Decode("token text has an odd number of hex digits".into()))?;
        CapabilityToken::decode(&bytes)
    }
}

/// A reader over untrusted bytes: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.0.len() < n {
            return Err(TokenError::Decode("the token is truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, TokenError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TokenError> {
        self.array().map(u16::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, TokenError> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Why a token was refused or could not be built. Links are numbered from 0, the root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token expired at {expires_at} (now {now}, Unix seconds)")]
    Expired { expires_at: u64, now: u64 },
    #[error("the token is not valid before {not_before} (now {now}, Unix seconds)")]
    NotYetValid { not_before: u64, now: u64 },
    #[error("link {link} of the token has a bad signature")]
    BadSignature { link: usize },
    #[error("the token was issued to another key than the one presenting it")]
    WrongAudience,
    #[error("link {link} of the token grants '{permission}', which the link before it does not")]
    Widened { link: usize, permission: String },
    #[error("the token chain has {len} links; the limit is {max}")]
    TooDeep { len: usize, max: usize },
    #[error("link {link} of the token has been revoked")]
    Revoked { link: usize },
    #[error("link {link} of the token does not chain to the link before it")]
    BrokenChain { link: usize },
    #[error("the token is {len} bytes; the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed token: {0}")]
    Decode(String),
    #[error("only the token's audience can delegate it")]
    NotHolder,
    #[error("a token link must grant at least one permission")]
    Empty,
    #[error("the validity window is empty: expires_at {expires_at} <= not_before {not_before}")]
    EmptyWindow { not_before: u64, expires_at: u64 },
    #[error(
        "the delegated window [{not_before}, {expires_at}) is not inside the parent's \
         [{parent_not_before}, {parent_expires_at})"
    )]
    WindowNotInParent {
        not_before: u64,
        expires_at: u64,
        parent_not_before: u64,
        parent_expires_at: u64,
    },
    #[error("invalid permission in token: {0}")]
    Permission(#[from] PermissionError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::permission::tests::arb_permission;
    use proptest::prelude::*;

    fn key(n: u8) -> NodeKey {
        NodeKey::from_secret_bytes(&[n; 32])
    }

    fn perms(texts: &[&str]) -> Vec<Permission> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    const NONCE: [u8; 16] = [0x5a; 16];

    /// root -> alice (kv:write:app/, doc:read:*) -> bob (kv:read:app/x)
    fn chain() -> (CapabilityToken, CapabilityToken) {
        let root = CapabilityToken::issue(
            &key(1),
            key(2).public(),
            perms(&["kv:write:app/", "doc:read:*"]),
            100,
            1000,
            NONCE,
        )
        .unwrap();
        let leaf = root
            .delegate(
                &key(2),
                key(3).public(),
                perms(&["kv:read:app/x"]),
                200,
                900,
                [1; 16],
            )
            .unwrap();
        (root, leaf)
    }

    fn never(_: &[u8; 32]) -> bool {
        false
    }

    #[test]
    fn issue_delegate_verify() {
        let (root, leaf) = chain();
        let v = root.verify(&key(2).public(), 100, never).unwrap();
        assert_eq!(v.root_issuer, key(1).public());
        assert_eq!(v.permissions, perms(&["kv:write:app/", "doc:read:*"]));
        assert_eq!(v.expires_at, 1000);
        assert_eq!(v.hashes, vec![root.hash()]);

        let v = leaf.verify(&key(3).public(), 500, never).unwrap();
        assert_eq!(v.root_issuer, key(1).public());
        assert_eq!(v.permissions, perms(&["kv:read:app/x"]));
        assert_eq!(v.expires_at, 900);
        assert_eq!(v.hashes, vec![root.hash(), leaf.hash()]);
        assert_eq!(leaf.links()[1].parent, Some(root.hash()));
        assert_eq!(leaf.link_hashes(), v.hashes);
        assert_eq!(leaf.audience(), key(3).public());
    }

    #[test]
    fn bytes_and_text_round_trip() {
        let (root, leaf) = chain();
        for t in [root, leaf] {
            assert_eq!(CapabilityToken::decode(&t.encode()).unwrap(), t);
            let text = t.to_string();
            assert!(text.starts_with("aspen-token-v1:"));
            assert_eq!(text.parse::<CapabilityToken>().unwrap(), t);
            assert_eq!(format!("  {text}\n").parse::<CapabilityToken>().unwrap(), t);
            assert!(matches!(
                text.to_uppercase().parse::<CapabilityToken>(),
                Err(TokenError::Decode(_))
            ));
            assert!(matches!(
                text[..text.len() - 1].parse::<CapabilityToken>(),
                Err(TokenError::Decode(_))
            ));
            assert!(matches!(
                text.replace("aspen-token-v1:", "")
                    .parse::<CapabilityToken>(),
                Err(TokenError::Decode(_))
            ));
        }
    }

    const GOLDEN: &str = concat!(
        "0101018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b4",
        "0f6f5c8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8f",
        "c9b39402000100046170702f0400000001020304050607081112131415161718",
        "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a00ea1fa3f6f14b5c104d223d5e9cec22",
        "8c33767e35fc6e210d41ca63a910488dd35df485dc334b789fe85f38102e4490",
        "012fdc847ca667f7165d6b16db6786d003",
    );

    #[test]
    fn golden_bytes() {
        let token = CapabilityToken::issue(
            &key(1),
            key(2).public(),
            perms(&["kv:write:app/", "cluster:read:*"]),
            0x0102030405060708,
            0x1112131415161718,
            NONCE,
        )
        .unwrap();
        let bytes = token.encode();
        let k1 = hex::encode(key(1).public());
        let k2 = hex::encode(key(2).public());
        let expected_head = format!(
            "0101{}{}{}{}{}{}{}{}",
            "01",
            k1,
            k2,
            "02",
            "000100046170702f", // kv write, 4 bytes "app/"
            "04000000",         // cluster read *
            "01020304050607081112131415161718",
            "5a".repeat(16) + "00",
        );
        assert_eq!(hex::encode(&bytes[..bytes.len() - 64]), expected_head);
        // Ed25519 signatures are deterministic: this pins the signed message format.
        assert_eq!(hex::encode(&bytes), GOLDEN);
    }

    #[test]
    fn expired_and_not_yet_valid() {
        let (_, leaf) = chain();
        let bob = key(3).public();
        leaf.verify(&bob, 200, never).unwrap();
        leaf.verify(&bob, 899, never).unwrap();
        assert_eq!(
            leaf.verify(&bob, 900, never),
            Err(TokenError::Expired {
                expires_at: 900,
                now: 900
            })
        );
        assert_eq!(
            leaf.verify(&bob, 199, never),
            Err(TokenError::NotYetValid {
                not_before: 200,
                now: 199
            })
        );
    }

    #[test]
    fn only_the_audience_can_use_it() {
        let (root, leaf) = chain();
        assert_eq!(
            leaf.verify(&key(2).public(), 500, never),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            root.verify(&key(3).public(), 500, never),
            Err(TokenError::WrongAudience)
        );
    }

    #[test]
    fn forged_signatures_are_refused() {
        let (_, leaf) = chain();
        let bob = key(3).public();
        for link in 0..2 {
            let mut links = leaf.links().to_vec();
            links[link].signature[10] ^= 1;
            let forged = CapabilityToken::from_links_unchecked(links);
            // Link 1's parent hash covers link 0's signature, so a forged link 0 also breaks
            // the chain; the signature is what is reported for link 0 itself.
            assert_eq!(
                forged.verify(&bob, 500, never),
                Err(TokenError::BadSignature { link })
            );
        }
        // Widening the leaf's own permissions breaks its signature.
        let mut links = leaf.links().to_vec();
        links[1].permissions = perms(&["kv:read:app/"]);
        assert_eq!(
            CapabilityToken::from_links_unchecked(links).verify(&bob, 500, never),
            Err(TokenError::BadSignature { link: 1 })
        );
        // A link "issued" by a key that did not sign it.
        let mut links = leaf.links().to_vec();
        links[0].issuer = key(9).public();
        assert_eq!(
            CapabilityToken::from_links_unchecked(links).verify(&bob, 500, never),
            Err(TokenError::BadSignature { link: 0 })
        );
    }

    #[test]
    fn every_single_byte_change_fails() {
        let (_, leaf) = chain();
        let bytes = leaf.encode();
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                if let Ok(m) = CapabilityToken::decode(&b) {
                    assert!(m.verify(&key(3).public(), 500, never).is_err(), "byte {i}");
                }
            }
        }
    }

    #[test]
    fn widened_delegations_are_refused() {
        let (root, _) = chain();
        let alice = key(2);
        let bob = key(3).public();
        // `delegate` refuses to build one.
        assert_eq!(
            root.delegate(&alice, bob, perms(&["kv:admin:app/"]), 200, 900, [1; 16]),
            Err(TokenError::Widened {
                link: 1,
                permission: "kv:admin:app/".into()
            })
        );
        assert!(matches!(
            root.delegate(&alice, bob, perms(&["kv:read:ap"]), 200, 900, [1; 16]),
            Err(TokenError::Widened { .. })
        ));
        // Alice signs one by hand: `verify` refuses it.
        let link = Link::sign(
            &alice,
            bob,
            perms(&["kv:read:app/x", "blob:read:*"]),
            200,
            900,
            [1; 16],
            Some(root.hash()),
        );
        let forged = CapabilityToken::from_links_unchecked(vec![root.links()[0].clone(), link]);
        assert_eq!(
            forged.verify(&bob, 500, never),
            Err(TokenError::Widened {
                link: 1,
                permission: "blob:read:*".into()
            })
        );
    }

    #[test]
    fn delegation_refusals() {
        let (root, leaf) = chain();
        let alice = key(2);
        let carol = key(4).public();
        assert_eq!(
            root.delegate(&key(3), carol, perms(&["kv:read:app/"]), 200, 900, NONCE),
            Err(TokenError::NotHolder)
        );
        assert_eq!(
            root.delegate(&alice, carol, vec![], 200, 900, NONCE),
            Err(TokenError::Empty)
        );
        assert_eq!(
            root.delegate(&alice, carol, perms(&["kv:read:app/"]), 50, 900, NONCE),
            Err(TokenError::WindowNotInParent {
                not_before: 50,
                expires_at: 900,
                parent_not_before: 100,
                parent_expires_at: 1000
            })
        );
        assert!(matches!(
            root.delegate(&alice, carol, perms(&["kv:read:app/"]), 200, 1001, NONCE),
            Err(TokenError::WindowNotInParent { .. })
        ));
        assert_eq!(
            root.delegate(&alice, carol, perms(&["kv:read:app/"]), 300, 300, NONCE),
            Err(TokenError::EmptyWindow {
                not_before: 300,
                expires_at: 300
            })
        );
        assert!(matches!(
            root.delegate(
                &alice,
                carol,
                vec![perms(&["kv:read:app/"])[0].clone(); MAX_PERMISSIONS + 1],
                200,
                900,
                NONCE
            ),
            Err(TokenError::Permission(PermissionError::TooMany { .. }))
        ));
        let invalid = Permission {
            kind: Kind::Cluster,
            action: Action::Read,
            pattern: Pattern::Prefix(b"x".to_vec()),
        };
        assert!(matches!(
            CapabilityToken::issue(&alice, carol, vec![invalid], 0, 1, NONCE),
            Err(TokenError::Permission(PermissionError::ClusterPattern(_)))
        ));
        // The chain's length is bounded: root + 3 delegations.
        let mut t = leaf;
        for n in 3..6u8 {
            let next = t.delegate(
                &key(n),
                key(n + 1).public(),
                perms(&["kv:read:app/x"]),
                200,
                900,
                NONCE,
            );
            if t.links().len() < MAX_CHAIN_LEN {
                t = next.unwrap();
            } else {
                assert_eq!(
                    next,
                    Err(TokenError::TooDeep {
                        len: MAX_CHAIN_LEN + 1,
                        max: MAX_CHAIN_LEN
                    })
                );
            }
        }
        assert_eq!(t.links().len(), MAX_CHAIN_LEN);
        t.verify(&key(5).public(), 500, never).unwrap();
        // Over-large tokens are refused when built, not truncated.
        let big: Vec<Permission> = (0..MAX_PERMISSIONS)
            .map(|i| {
                Permission::new(
                    Kind::Kv,
                    Action::Read,
                    Pattern::Prefix(vec![i as u8; MAX_PATTERN_BYTES]),
                )
                .unwrap()
            })
            .collect();
        assert!(matches!(
            CapabilityToken::issue(&alice, carol, big, 0, 1, NONCE),
            Err(TokenError::TooLarge { .. })
        ));
    }

    #[test]
    fn too_deep_chains_are_refused() {
        // Build a 5-link chain by hand (each link correctly chained and signed).
        let mut links: Vec<Link> = Vec::new();
        for n in 1..=MAX_CHAIN_LEN as u8 + 1 {
            let parent = (!links.is_empty()).then(|| chain_hash(&links));
            links.push(Link::sign(
                &key(n),
                key(n + 1).public(),
                perms(&["kv:read:*"]),
                0,
                10,
                NONCE,
                parent,
            ));
        }
        let deep = CapabilityToken::from_links_unchecked(links);
        let too_deep = TokenError::TooDeep {
            len: MAX_CHAIN_LEN + 1,
            max: MAX_CHAIN_LEN,
        };
        assert_eq!(
            deep.verify(&key(6).public(), 5, never).unwrap_err(),
            too_deep
        );
        assert_eq!(
            CapabilityToken::decode(&deep.encode()).unwrap_err(),
            too_deep
        );
    }

    #[test]
    fn revoking_a_parent_revokes_its_delegations() {
        let (root, leaf) = chain();
        let bob = key(3).public();
        let root_hash = root.hash();
        assert_eq!(
            leaf.verify(&bob, 500, |h| *h == root_hash),
            Err(TokenError::Revoked { link: 0 })
        );
        let leaf_hash = leaf.hash();
        assert_eq!(
            leaf.verify(&bob, 500, |h| *h == leaf_hash),
            Err(TokenError::Revoked { link: 1 })
        );
        // Revoking the leaf leaves the root usable.
        root.verify(&key(2).public(), 500, |h| *h == leaf_hash)
            .unwrap();
    }

    #[test]
    fn links_cannot_move_to_another_chain() {
        let (root, leaf) = chain();
        let bob = key(3).public();
        // Alice holds a second token from the root, with the same permissions.
        let other = CapabilityToken::issue(
            &key(1),
            key(2).public(),
            perms(&["kv:write:app/", "doc:read:*"]),
            100,
            1000,
            [9; 16],
        )
        .unwrap();
        // Bob's link, delegated from the first, grafted onto the second: its parent hash names
        // the first token, so revoking the first still reaches it.
        let grafted = CapabilityToken::from_links_unchecked(vec![
            other.links()[0].clone(),
            leaf.links()[1].clone(),
        ]);
        assert_eq!(
            grafted.verify(&bob, 500, never),
            Err(TokenError::BrokenChain { link: 1 })
        );
        // Rewriting the parent hash breaks the signature.
        let mut moved = leaf.links()[1].clone();
        moved.parent = Some(other.hash());
        let moved = CapabilityToken::from_links_unchecked(vec![other.links()[0].clone(), moved]);
        assert_eq!(
            moved.verify(&bob, 500, never),
            Err(TokenError::BadSignature { link: 1 })
        );
        // A link whose issuer is not the previous audience.
        let stranger = Link::sign(
            &key(7),
            bob,
            perms(&["kv:read:app/x"]),
            200,
            900,
            NONCE,
            Some(root.hash()),
        );
        let stolen = CapabilityToken::from_links_unchecked(vec![root.links()[0].clone(), stranger]);
        assert_eq!(
            stolen.verify(&bob, 500, never),
            Err(TokenError::BrokenChain { link: 1 })
        );
        // A root with a parent, and a cut chain (the leaf alone).
        let cut = CapabilityToken::from_links_unchecked(vec![leaf.links()[1].clone()]);
        assert_eq!(
            cut.verify(&bob, 500, never),
            Err(TokenError::BrokenChain { link: 0 })
        );
    }

    #[test]
    fn decoding_is_strict() {
        let (_, leaf) = chain();
        let bytes = leaf.encode();
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            CapabilityToken::decode(&trailing),
            Err(TokenError::Decode(_))
        ));
        assert!(matches!(
            CapabilityToken::decode(&bytes[..bytes.len() - 1]),
            Err(TokenError::Decode(_))
        ));
        let mut version = bytes.clone();
        version[0] = 2;
        assert!(matches!(
            CapabilityToken::decode(&version),
            Err(TokenError::Decode(_))
        ));
        let mut zero = bytes.clone();
        zero[1] = 0;
        assert!(matches!(
            CapabilityToken::decode(&zero),
            Err(TokenError::Decode(_))
        ));
        assert!(matches!(
            CapabilityToken::decode(&vec![0; MAX_TOKEN_BYTES + 1]),
            Err(TokenError::TooLarge { .. })
        ));
        // The root's parent flag (just before its signature) must be 0 or 1.
        let root_len = leaf.links()[0].encoded_len();
        let mut flag = bytes.clone();
        flag[2 + root_len - 65] = 2;
        assert!(matches!(
            CapabilityToken::decode(&flag),
            Err(TokenError::Decode(_))
        ));
    }

    fn arb_token() -> impl Strategy<Value = CapabilityToken> {
        (
            proptest::collection::vec(arb_permission(), 1..4),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<bool>(),
        )
            .prop_filter("non-empty window", |(_, a, b, _, _)| a != b)
            .prop_map(|(permissions, a, b, nonce, delegate)| {
                let (nb, exp) = (a.min(b), a.max(b));
                let root = CapabilityToken::issue(
                    &key(1),
                    key(2).public(),
                    permissions.clone(),
                    nb,
                    exp,
                    nonce,
                )
                .unwrap();
                if delegate {
                    root.delegate(&key(2), key(3).public(), permissions, nb, exp, nonce)
                        .unwrap()
                } else {
                    root
                }
            })
    }

    proptest! {
        #[test]
        fn tokens_round_trip_and_verify(t in arb_token()) {
            let bytes = t.encode();
            prop_assert_eq!(bytes.len(), t.encoded_len());
            prop_assert_eq!(&CapabilityToken::decode(&bytes).unwrap(), &t);
            prop_assert_eq!(&t.to_string().parse::<CapabilityToken>().unwrap(), &t);
            let leaf = t.leaf();
            t.verify(&t.audience(), leaf.not_before, never).unwrap();
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(t) = CapabilityToken::decode(&bytes) {
                prop_assert_eq!(t.encode(), bytes);
            }
        }

        #[test]
        fn mutated_tokens_decode_and_parse_without_panicking(
            t in arb_token(), at in any::<usize>(), b in any::<u8>()
        ) {
            let mut bytes = t.encode();
            let i = at % bytes.len();
            bytes[i] = b;
            if let Ok(m) = CapabilityToken::decode(&bytes) {
                prop_assert_eq!(m.encode(), bytes.clone());
            }
            bytes.truncate(i);
            prop_assert!(CapabilityToken::decode(&bytes).is_err());
            let _ = format!("{TOKEN_TEXT_PREFIX}{}", hex::encode(&bytes)).parse::<CapabilityToken>();
        }

        /// Changing any single byte of a valid token never yields a token that verifies.
        #[test]
        fn any_single_byte_change_fails(at in any::<usize>(), flip in 1..=255u8) {
            let (_, leaf) = chain();
            let mut bytes = leaf.encode();
            let i = at % bytes.len();
            bytes[i] ^= flip;
            if let Ok(m) = CapabilityToken::decode(&bytes) {
                prop_assert!(m.verify(&key(3).public(), 500, never).is_err());
            }
        }
    }
}
