//! etcd's error statuses.
//!
//! etcd's clients recognise an error by its gRPC status message (the Go client maps the exact
//! text back to a typed error, and retries or re-authenticates on some), so each error here
//! carries the code and message etcd itself sends. Errors only Aspen has say `aspen:`.

use aspen_kv::api::{ApplyError, LimitError, ReadError};
use tonic::Code;

/// An error answered on the etcd API.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    /// etcd's election service: the caller's key is not the leader's (any more).
    #[error("election: not leader")]
    ElectionNotLeader,
    /// etcd's election service: nobody campaigns.
    #[error("election: no leader")]
    ElectionNoLeader,
    /// A request etcd would serve but Aspen does not (yet), or one that makes no sense here
    /// (etcd's own membership and user management): says what to do instead.
    #[error("aspen: {0}")]
    Unsupported(String),
    /// A malformed request etcd has no error of its own for.
    #[error("aspen: {0}")]
    InvalidArgument(String),
    /// A request over one of Aspen's bounds that etcd has no error of its own for.
    #[error("aspen: {0}")]
    ResourceExhausted(String),
    #[error("aspen: {0}")]
    Unavailable(String),
    #[error("aspen: {0}")]
    Internal(String),
}

impl EtcdError {
    /// The gRPC status code etcd sends with this error.
    pub fn code(&self) -> Code {
        use EtcdError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge | UserEmpty | AuthFailed | InvalidArgument(_) => {
                Code::InvalidArgument
            }
            Compacted | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExist => Code::FailedPrecondition,
            TooManyRequests | ResourceExhausted(_) => Code::ResourceExhausted,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            NoLeader | Timeout | Unavailable(_) => Code::Unavailable,
            Unsupported(_) => Code::Unimplemented,
            Internal(_) => Code::Internal,
            // etcd returns these as plain Go errors, which gRPC sends as "unknown".
            ElectionNotLeader | ElectionNoLeader => Code::Unknown,
        }
    }

    /// The status sent to the client.
    pub fn status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), self.to_string())
    }
}

impl From<EtcdError> for tonic::Status {
    fn from(e: EtcdError) -> Self {
        e.status()
    }
}

impl From<LimitError> for EtcdError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::EmptyKey => EtcdError::EmptyKey,
            LimitError::KeyTooLarge { .. } | LimitError::ValueTooLarge { .. } => {
                EtcdError::RequestTooLarge
            }
            LimitError::TooManyTxnOps { .. } => EtcdError::TooManyOps,
            LimitError::TxnWritesOverlap { .. } => EtcdError::DuplicateKey,
            e @ LimitError::CompareRangeTooLarge { .. } => {
                EtcdError::ResourceExhausted(e.to_string())
            }
            LimitError::LeaseTtlOutOfRange { ttl_secs, max, .. } if ttl_secs > max => {
                EtcdError::LeaseTtlTooLarge
            }
            other => EtcdError::InvalidArgument(other.to_string()),
        }
    }
}

impl From<ApplyError> for EtcdError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Limit(l) => l.into(),
            ApplyError::Compacted { .. } => EtcdError::Compacted,
            ApplyError::FutureRevision { .. } => EtcdError::FutureRev,
            ApplyError::LeaseNotFound { .. } => EtcdError::LeaseNotFound,
            ApplyError::LeaseExists { .. } => EtcdError::LeaseExist,
            ApplyError::KeyNotFound { .. } => EtcdError::KeyNotFound,
            ApplyError::TooManyLeases { .. } | ApplyError::LeaseFull { .. } => {
                EtcdError::ResourceExhausted(e.to_string())
            }
            ApplyError::StaleSequence { .. } | ApplyError::SessionWindowFull { .. } => {
                EtcdError::Internal(e.to_string())
            }
        }
    }
}

impl From<ReadError> for EtcdError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Limit(l) => l.into(),
            ReadError::Compacted { .. } => EtcdError::Compacted,
            ReadError::FutureRevision { .. } => EtcdError::FutureRev,
            ReadError::Storage(s) => EtcdError::Internal(format!("storage: {s}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts clients match on, checked once against etcd 3.5's `rpctypes`.
    #[test]
    fn statuses_are_etcds() {
        let cases = [
            (
                EtcdError::Compacted,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                EtcdError::FutureRev,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            (
                EtcdError::InvalidAuthToken,
                Code::Unauthenticated,
                "etcdserver: invalid auth token",
            ),
            (
                EtcdError::UserEmpty,
                Code::InvalidArgument,
                "etcdserver: user name is empty",
            ),
            (
                EtcdError::PermissionDenied,
                Code::PermissionDenied,
                "etcdserver: permission denied",
            ),
            (
                EtcdError::LeaseNotFound,
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                EtcdError::DuplicateKey,
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
            (
                EtcdError::AuthFailed,
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
        ];
        for (e, code, text) in cases {
            let s = e.status();
            assert_eq!((s.code(), s.message()), (code, text));
        }
    }
}
