//! The commands behind `mbt-edge`'s subcommands. `main.rs` parses arguments and calls one of
//! these; each returns a [`Failure`](crate::daemon::Failure) carrying its exit code.

mod bench;
mod classify;
mod record;
mod run;

pub use bench::bench;
pub use classify::classify;
pub use record::record;
pub use run::{check_config, run};
