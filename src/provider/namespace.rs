//! [`GroupNamespace`]: where a provider's consumer groups live, so that brokers of one process
//! can tell when they would share one.

use std::fmt;

/// Where a provider's consumer groups live: providers of one namespace share their groups, so a
/// group opened through either is one group on the backend.
///
/// A network provider's namespace is its server as configured and the place on it that holds
/// the groups: Redis, the address, the database number and the stream's key; NATS, the servers and
/// the stream; PostgreSQL, the servers, the database and the events table. Two provider objects
/// that a configuration builds for two brokers are thus of one namespace, as two processes on one
/// server are. A provider that says nothing ([`Provider::group_namespace`]'s default) is a
/// namespace of its own, as the in-process bus of a [`MemoryProvider`](crate::MemoryProvider) is.
///
/// A broker uses it to refuse a second broker of the process under the same instance id in the
/// same namespace (see [`BrokerBuilder::instance_id`](crate::BrokerBuilder::instance_id)).
/// Addresses are compared as configured, never resolved: `localhost` and `127.0.0.1` are two
/// namespaces here, though one server.
///
/// ```
/// use eventbroker::{GroupNamespace, MemoryProvider, Provider};
///
/// let bus = MemoryProvider::default();
/// assert_eq!(bus.group_namespace(), bus.group_namespace());
/// assert_ne!(bus.group_namespace(), MemoryProvider::default().group_namespace(), "a bus each");
///
/// // A backend of your own names its server and the place its groups live.
/// let topic = GroupNamespace::new("kafka", "broker-1:9092, topic orders");
/// assert_eq!(topic.to_string(), "kafka broker-1:9092, topic orders");
/// ```
///
/// [`Provider::group_namespace`]: crate::Provider::group_namespace
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GroupNamespace {
    /// The provider's [`name`](crate::Provider::name).
    provider: &'static str,
    place: Place,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Place {
    /// The provider object at this address: groups no other object shares.
    Object(usize),
    /// A server and a place on it, described.
    Named(String),
}

impl GroupNamespace {
    /// The namespace of a `provider` backend at `place`: its server(s) as configured and where on
    /// them the groups live. Namespaces of one provider name and one description are one. It
    /// appears in error messages: leave passwords and tokens out.
    pub fn new(provider: &'static str, place: impl Into<String>) -> Self {
        Self { provider, place: Place::Named(place.into()) }
    }

    /// The namespace of `object` alone, a `provider` provider: groups no other object shares (the
    /// default of [`Provider::group_namespace`](crate::Provider::group_namespace)). It names the
    /// object while the object lives: another may take its address after it.
    ///
    /// ```
    /// use eventbroker::{GroupNamespace, MemoryProvider, Provider};
    ///
    /// let bus = MemoryProvider::default();
    /// assert_eq!(GroupNamespace::of_object("memory", &bus), bus.group_namespace());
    /// ```
    pub fn of_object<P: ?Sized>(provider: &'static str, object: &P) -> Self {
        Self { provider, place: Place::Object(std::ptr::from_ref(object).cast::<()>() as usize) }
    }

    /// Whether this is one provider object's namespace ([`of_object`](Self::of_object)).
    ///
    /// ```
    /// use eventbroker::{MemoryProvider, Provider};
    ///
    /// assert!(MemoryProvider::default().group_namespace().is_object());
    /// ```
    pub fn is_object(&self) -> bool {
        matches!(self.place, Place::Object(_))
    }
}

impl fmt::Display for GroupNamespace {
    /// `<provider> <place>`, or `<provider> provider object 0x…` for one object's.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.place {
            Place::Object(address) => write!(f, "{} provider object {address:#x}", self.provider),
            Place::Named(place) => write!(f, "{} {place}", self.provider),
        }
    }
}

impl fmt::Debug for GroupNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GroupNamespace").field(&format_args!("{self}")).finish()
    }
}
