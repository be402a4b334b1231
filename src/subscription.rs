//! Subscriptions: who receives which events.

use std::fmt;

/// Identifies one subscription of one broker. Ids increase in subscription order, which is the
/// order handlers run in.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SubscriptionId(pub(crate) u64);

impl SubscriptionId {
    /// The id as a number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// An id from a number, as read back from a dead letter or a log.
    pub const fn from_raw(id: u64) -> Self {
        Self(id)
    }
}

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sub-{}", self.0)
    }
}

impl fmt::Debug for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubscriptionId({})", self.0)
    }
}
