//! Test utilities (feature `test-util`): the provider conformance suite and a fault-injecting
//! provider.
//!
//! - [`conformance`]: every scenario a provider must pass, single-provider and across instances,
//!   and [`conformance_suite!`](crate::conformance_suite), which turns them into `#[test]`s for a
//!   backend. Each backend of this crate runs it, and a provider of your own can too.
//! - [`FaultyProvider`]: wraps any provider and makes chosen calls fail, hang, panic or slow down,
//!   to test what a broker does when its backend misbehaves.
//! - [`Recorder`]: a subscriber that records what it receives, and waits with a bound until a
//!   test's expected number of events has arrived.
//!
//! ```toml
//! [dev-dependencies]
//! eventbroker = { version = "0.1", features = ["test-util"] }
//! ```

pub mod conformance;
mod fault;
mod recorder;

pub use self::fault::{Fault, FaultyProvider, Operation};
pub use self::recorder::{Recorder, WaitTimedOut};
