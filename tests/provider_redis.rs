//! The Redis provider against the real server on 127.0.0.1:6379: the whole conformance suite
//! (single-provider, consumer groups and two brokers), then what only this backend promises.

mod redis_support;

eventbroker::conformance_suite!(conformance, crate::redis_support::RedisBackend::new);
