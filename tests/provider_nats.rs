//! The NATS JetStream provider against the real server: the conformance suite, then what only
//! this backend promises.

eventbroker::conformance_suite!(nats, eventbroker::provider::nats::NatsBackend::new);
