//! loom models of `eventbroker`; everything lives in `tests/`. Run with
//! `RUSTFLAGS="--cfg eventbroker_loom" cargo test --release`.
