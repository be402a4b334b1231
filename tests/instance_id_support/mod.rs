//! One instance id per backend namespace in a process, run against each network provider by its
//! test binary through the configuration path: the factory makes a provider object for every
//! broker it builds, so two brokers built from one `Config` share a backend, not an object.

#![allow(dead_code, reason = "each test binary uses its own part of this")]

use std::time::Duration;

use eventbroker::config::Config;
use eventbroker::{Broker, BuildError, Distribution};

const WAIT: Duration = Duration::from_secs(10);

fn build(config: &Config, id: &str, distribution: Option<Distribution>) -> Result<Broker, BuildError> {
    let mut config = config.clone();
    id.clone_into(&mut config.instance_id);
    config.worker_count = 1;
    config.distribution = distribution;
    config.build()
}

/// Asserts `result` is the refusal of `id`, naming it and `namespace` (what the brokers share).
fn assert_refused(result: Result<Broker, BuildError>, id: &str, namespace: &str) {
    let err = result.map(drop).expect_err("a second broker of one id on one namespace");
    assert!(
        matches!(&err, BuildError::Config(e) if e.key() == "instance_id"
            && e.reason().contains(&format!("{id:?}"))
            && e.reason().contains(namespace)),
        "{err}"
    );
}

/// On `config`'s backend namespace (`namespace` is how the error names it), one broker of this
/// process receives under an id at a time, fan-out or work-queue, in one group or two: the second
/// is refused, naming the id and the namespace. Another id, a broker that does not receive
/// (local), or the same id on `elsewhere` (the same server, another namespace) is no conflict;
/// once the first has shut down, or been dropped, the id may be taken again.
pub fn one_instance_id_receives_from_a_namespace_once(config: &Config, namespace: &str, elsewhere: &Config) {
    let first = build(config, "dup-orders-1", None).expect("the first broker");
    assert_refused(build(config, "dup-orders-1", None), "dup-orders-1", namespace);

    let other_id = build(config, "dup-orders-2", None).expect("another id");
    let local = build(config, "dup-orders-1", Some(Distribution::Local)).expect("a local broker");
    let other_namespace = build(elsewhere, "dup-orders-1", None).expect("the same id elsewhere");

    let workers = Some(Distribution::WorkQueue("dup-workers".into()));
    let member = build(config, "dup-worker-1", workers.clone()).expect("a work-queue member");
    assert_refused(build(config, "dup-worker-1", workers.clone()), "dup-worker-1", namespace);
    let second_member = build(config, "dup-worker-2", workers.clone()).expect("a second member, its own id");
    assert_refused(build(config, "dup-orders-1", workers), "dup-orders-1", namespace);

    assert!(first.shutdown(WAIT).is_clean());
    let next = build(config, "dup-orders-1", None).expect("the id is free once its broker shut down");
    for broker in [next, other_id, local, other_namespace, member, second_member] {
        assert!(broker.shutdown(WAIT).is_clean());
    }

    let dropped = build(config, "dup-orders-3", None).expect("a broker to drop");
    drop(dropped);
    let again = build(config, "dup-orders-3", None).expect("a dropped broker frees its id");
    assert!(again.shutdown(WAIT).is_clean());
}
