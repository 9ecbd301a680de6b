//! etcd's watches on the store's.
//!
//! A watch of the store follows a key range from a revision on and sends every event in
//! revision order (`node/src/server/watch.rs`). etcd's watch adds filters (no puts, no
//! deletes), asks for progress notifications every ten minutes, and sends a revision in
//! fragments only when the client asked for that; [`WatchPlan`] holds what the store's watch
//! does not, and [`to_pb_event`] shows an event as etcd does.

use aspen_kv::api::{Event, EventKind, Key, Revision};

use crate::pb::etcdserverpb::watch_create_request::FilterType;
use crate::pb::etcdserverpb::WatchCreateRequest;
use crate::pb::mvccpb;
use crate::range::{key_range, to_pb};
use crate::revision::watch_from_etcd;
use crate::EtcdError;

/// How often etcd sends a progress notification to a watch that asked for them.
pub const PROGRESS_EVERY_MS: u64 = 10 * 60 * 1000;

/// One etcd watch, as the store's watch and what the node does on top.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchPlan {
    pub start: Key,
    pub end: Option<Key>,
    /// The first store revision wanted (0: from now on).
    pub from: Revision,
    pub prev_kv: bool,
    /// Progress notifications, every [`PROGRESS_EVERY_MS`].
    pub progress_every_ms: u64,
    pub no_put: bool,
    pub no_delete: bool,
    /// Whether the client takes a large revision in fragments.
    pub fragment: bool,
}

impl WatchPlan {
    pub fn new(req: &WatchCreateRequest) -> Result<WatchPlan, EtcdError> {
        if req.key.is_empty() {
            return Err(EtcdError::EmptyKey);
        }
        let (mut no_put, mut no_delete) = (false, false);
        for f in &req.filters {
            match FilterType::try_from(*f) {
                Ok(FilterType::Noput) => no_put = true,
                Ok(FilterType::Nodelete) => no_delete = true,
                Err(_) => {
                    return Err(EtcdError::InvalidArgument(format!(
                        "unknown watch filter {f}"
                    )))
                }
            }
        }
        let (start, end) = key_range(&req.key, &req.range_end);
        Ok(WatchPlan {
            start,
            end,
            from: watch_from_etcd(req.start_revision),
            prev_kv: req.prev_kv,
            progress_every_ms: if req.progress_notify {
                PROGRESS_EVERY_MS
            } else {
                0
            },
            no_put,
            no_delete,
            fragment: req.fragment,
        })
    }

    /// Whether the client wants this event (its filters).
    pub fn wants(&self, event: &Event) -> bool {
        match event.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        }
    }
}

/// A store event as etcd shows it.
pub fn to_pb_event(event: Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match event.kind {
            EventKind::Put => mvccpb::event::EventType::Put,
            EventKind::Delete => mvccpb::event::EventType::Delete,
        } as i32,
        kv: Some(to_pb(event.kv)),
        prev_kv: event.prev_kv.map(to_pb),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspen_kv::api::KeyValue;

    #[test]
    fn filters_and_revisions_are_etcds() {
        let plan = WatchPlan::new(&WatchCreateRequest {
            key: b"a".to_vec(),
            range_end: b"\0".to_vec(),
            start_revision: 5,
            filters: vec![FilterType::Noput as i32],
            progress_notify: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (plan.start.as_slice(), plan.end.as_deref()),
            (&b"a"[..], Some(&b""[..]))
        );
        assert_eq!(plan.from, 4, "etcd's revision 5 is the store's 4");
        assert_eq!(plan.progress_every_ms, PROGRESS_EVERY_MS);
        let kv = KeyValue {
            key: b"a".to_vec(),
            value: b"v".to_vec(),
            create_revision: 4,
            mod_revision: 4,
            version: 1,
            lease: 0,
        };
        let put = Event {
            kind: EventKind::Put,
            kv: kv.clone(),
            prev_kv: None,
        };
        let delete = Event {
            kind: EventKind::Delete,
            kv,
            prev_kv: None,
        };
        assert!(!plan.wants(&put));
        assert!(plan.wants(&delete));
        let pb = to_pb_event(delete);
        assert_eq!(pb.r#type, mvccpb::event::EventType::Delete as i32);
        assert_eq!(pb.kv.unwrap().mod_revision, 5);
        assert!(WatchPlan::new(&WatchCreateRequest::default()).is_err());
        assert!(WatchPlan::new(&WatchCreateRequest {
            key: b"a".to_vec(),
            filters: vec![9],
            ..Default::default()
        })
        .is_err());
    }
}
