//! Linearizability checking for Aspen's key-value store.
//!
//! Tests that drive a cluster with concurrent clients record every operation with a
//! [`Recorder`]: the moment it was invoked, and the moment and outcome of its return, or that
//! its outcome is unknown (a timeout, a connection lost mid-request). [`check`] then decides
//! whether some total order of the operations, consistent with real time, explains every
//! observed result under a sequential key-value model ([`model`]).
//!
//! The search is the one of Wing & Gong, with Lowe's memoisation of (linearized set, state)
//! pairs, as in Porcupine. Linearizability is local (Herlihy & Wing), so a history is split by
//! key and each key is checked on its own, which keeps the search small.
//!
//! Why in-repo and not a stand-in: the checker must also be shown to *fail* on bad histories;
//! `tests/known_bad.rs` feeds it hand-made anomalies and the store's fault tests include a
//! negative control it must catch.

mod history;
pub mod model;
mod search;
mod workload;

pub use history::{History, Operation, Pending, Recorder};
pub use model::{Op, Outcome};
pub use search::{check, check_with_budget, Anomaly, Report, DEFAULT_STEP_BUDGET};
pub use workload::OpMix;
