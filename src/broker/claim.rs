//! [`InstanceClaim`]: a receiving broker's hold on its instance id in its provider's
//! [`GroupNamespace`], so that a second broker of this process cannot join the first's group under
//! the same name.

use crate::error::{BuildError, ConfigError};
use crate::provider::{ConsumerGroup, GroupNamespace, Provider};

/// A broker of this process that receives from a provider.
struct Receiving {
    namespace: GroupNamespace,
    instance_id: String,
    /// Its group, for the error that names what a second broker would share.
    group: ConsumerGroup,
}

/// The brokers of this process that receive from a provider (see
/// [`BrokerBuilder::instance_id`](super::BrokerBuilder::instance_id)): a handful, searched in
/// order.
static RECEIVING: parking_lot::Mutex<Vec<Receiving>> = parking_lot::Mutex::new(Vec::new());

/// A receiving broker's hold on its instance id in its provider's namespace, from `build` to the
/// end of its shutdown (or its drop).
pub(crate) struct InstanceClaim {
    namespace: GroupNamespace,
    instance_id: String,
}

impl InstanceClaim {
    /// Takes `instance_id` in `provider`'s namespace for a broker receiving in `group`.
    ///
    /// Refused whatever either broker's group (the reasons are in the error).
    pub(crate) fn take(
        provider: &dyn Provider,
        instance_id: &str,
        group: &ConsumerGroup,
    ) -> Result<Self, BuildError> {
        let namespace = provider.group_namespace();
        let mut receiving = RECEIVING.lock();
        if let Some(other) =
            receiving.iter().find(|r| r.namespace == namespace && r.instance_id == instance_id)
        {
            let why = match (&other.group, group) {
                (ConsumerGroup::Instance(_), ConsumerGroup::Instance(_)) => {
                    "in one fan-out group, each would get only part of the other instances' events, \
                     and skip the other's as its own echoes"
                }
                (ConsumerGroup::Shared(a), ConsumerGroup::Shared(b)) if a == b => {
                    "in one work-queue group they are one consumer, and each may take over or give \
                     back what the other holds"
                }
                _ => "both publish under it, and nothing tells their events apart",
            };
            return Err(BuildError::Config(ConfigError::new(
                "instance_id",
                format!(
                    "{instance_id:?} is the id of another broker of this process receiving from the \
                     same place ({namespace}), in {} group {:?}: {why}; give each broker its own id",
                    if other.group.is_shared() { "work-queue" } else { "fan-out" },
                    other.group.name(),
                ),
            )));
        }
        receiving.push(Receiving {
            namespace: namespace.clone(),
            instance_id: instance_id.to_owned(),
            group: group.clone(),
        });
        Ok(Self { namespace, instance_id: instance_id.to_owned() })
    }
}

impl Drop for InstanceClaim {
    fn drop(&mut self) {
        let mut receiving = RECEIVING.lock();
        if let Some(at) =
            receiving.iter().position(|r| r.namespace == self.namespace && r.instance_id == self.instance_id)
        {
            receiving.swap_remove(at);
        }
    }
}
