//! The async dispatch engine: shard ring buffers and how their workers wait.
//!
//! - [`ring`]: the bounded MPSC ring buffer each shard queues events in.
//! - [`wait`]: how an idle worker waits ([`WaitStrategy`](wait::WaitStrategy)) and how
//!   publishers wake it.
//! - [`shard`]: the shards, each a ring and a worker thread, and the routing of events to them.
//! - [`worker`]: the worker loop: batched draining, matching, delivery, retries.
//! - [`retry`]: the retry policy and the delay queue retries wait in.
//! - [`backpressure`]: what a publisher does when its shard is full, and how it is woken.
//! - [`spent`]: events a worker has finished with, handed back for publishers to reuse.
//! - [`intake`]: whether the broker accepts work, and the synchronous publishes in flight.
//! - [`acked`]: acknowledged deliveries, settled by their consumer with `ack` or `fail`.
//! - [`delivery`]: one handler call for one job, and the bookkeeping of a job's deliveries, shared
//!   by the workers and the caller-thread paths.
//! - [`inbound`]: the thread that feeds other instances' events into the shards.
//! - [`writer`]: the thread that batches stores, statuses, dead letters and acks to the provider.

pub(crate) mod acked;
pub(crate) mod backpressure;
pub(crate) mod delivery;
pub(crate) mod inbound;
pub(crate) mod intake;
pub(crate) mod retry;
pub(crate) mod ring;
pub(crate) mod shard;
pub(crate) mod spent;
pub(crate) mod wait;
pub(crate) mod worker;
pub(crate) mod writer;
