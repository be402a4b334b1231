//! The async dispatch engine: shard ring buffers and how their workers wait.
//!
//! - [`ring`]: the bounded MPSC ring buffer each shard queues events in.
//! - [`wait`]: how an idle worker waits ([`WaitStrategy`](wait::WaitStrategy)) and how
//!   publishers wake it.

pub(crate) mod ring;
pub(crate) mod wait;
