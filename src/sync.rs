//! The one place the crate takes its atomics, cells and thread primitives from.
//!
//! Built normally this re-exports `std`. Built with `RUSTFLAGS="--cfg eventbroker_loom"` it
//! re-exports [loom](https://docs.rs/loom)'s model-checked twins instead, so the models in
//! `loom-tests/` explore the very code that ships. Code that touches shared state across threads
//! must import from here, never from `std::sync` directly.

#[cfg(not(eventbroker_loom))]
#[allow(
    unused_imports,
    dead_code,
    reason = "each build, and each stage of the crate, uses a different subset"
)]
mod imp {
    pub(crate) use std::sync::Arc;
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};

    pub(crate) mod thread {
        pub(crate) use std::thread::{JoinHandle, Thread, current, park, park_timeout, yield_now};

        /// Spawns a named OS thread. Named threads show up in `top -H`, debuggers and panics.
        pub(crate) fn spawn_named<F, T>(name: String, f: F) -> std::io::Result<JoinHandle<T>>
        where
            F: FnOnce() -> T + Send + 'static,
            T: Send + 'static,
        {
            std::thread::Builder::new().name(name).spawn(f)
        }
    }

    pub(crate) mod hint {
        pub(crate) use std::hint::spin_loop;
    }

    /// An atomically replaceable `Arc`: readers load without locking (arc-swap), writers store.
    pub(crate) struct ArcCell<T>(arc_swap::ArcSwap<T>);

    impl<T> ArcCell<T> {
        pub(crate) fn new(value: Arc<T>) -> Self {
            Self(arc_swap::ArcSwap::new(value))
        }

        /// The current value. Lock-free; sees every `store` that happened before it.
        pub(crate) fn load(&self) -> Arc<T> {
            self.0.load_full()
        }

        pub(crate) fn store(&self, value: Arc<T>) {
            self.0.store(value);
        }
    }

    /// `UnsafeCell` with loom's closure-based API, so call sites read the same under both builds.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }

        /// Runs `f` with a shared raw pointer to the contents.
        #[allow(clippy::inline_always, reason = "a zero-cost wrapper; it must vanish in debug builds too")]
        #[inline(always)]
        pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        /// Runs `f` with a mutable raw pointer to the contents.
        #[allow(clippy::inline_always, reason = "a zero-cost wrapper; it must vanish in debug builds too")]
        #[inline(always)]
        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(eventbroker_loom)]
#[allow(
    unused_imports,
    dead_code,
    reason = "each build, and each stage of the crate, uses a different subset"
)]
mod imp {
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::Arc;
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};

    /// loom cannot see inside arc-swap; a mutex gives the same observable behaviour (each load
    /// sees one whole stored value, and every store that happened before it) for the model.
    pub(crate) struct ArcCell<T>(loom::sync::Mutex<Arc<T>>);

    impl<T> ArcCell<T> {
        pub(crate) fn new(value: Arc<T>) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn load(&self) -> Arc<T> {
            Arc::clone(&self.0.lock().unwrap())
        }

        pub(crate) fn store(&self, value: Arc<T>) {
            *self.0.lock().unwrap() = value;
        }
    }

    pub(crate) mod thread {
        pub(crate) use loom::thread::{JoinHandle, Thread, current, park, yield_now};

        /// loom has no timed park; a timed wait is modelled as a spurious wake-up, which every
        /// caller must already tolerate.
        pub(crate) fn park_timeout(_timeout: std::time::Duration) {
            loom::thread::yield_now();
        }

        /// loom threads carry no OS name; the name is dropped.
        #[allow(clippy::unnecessary_wraps, reason = "the signature of the std version, which can fail")]
        pub(crate) fn spawn_named<F, T>(_name: String, f: F) -> std::io::Result<JoinHandle<T>>
        where
            F: FnOnce() -> T + Send + 'static,
            T: Send + 'static,
        {
            Ok(loom::thread::spawn(f))
        }
    }

    pub(crate) mod hint {
        pub(crate) use loom::hint::spin_loop;
    }
}

#[allow(unused_imports)] // Each build uses a different subset.
pub(crate) use imp::*;
