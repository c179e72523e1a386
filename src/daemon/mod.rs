//! The running daemon and what every command shares with it.
//!
//! [`prepare`] loads config and model and checks them against each other; [`Sources`] starts
//! the capture pipelines and runs the window stage ([`stage`]) on the caller's thread;
//! [`infer`] is the inference worker. [`run`] is `mbt-edge run`: it adds the events thread
//! (event engine and publisher), the health thread, the metrics endpoint and SIGHUP reload.
//! The commands in `cli` call into here; no command-line parsing happens in this module.

mod controls;
mod events;
mod health;
pub mod infer;
mod prepare;
mod reload;
mod run;
mod sources;
pub mod stage;
mod state;

pub use infer::{ScoredWindow, WindowQueue};
pub use prepare::{Failure, Prepared, exit, prepare};
pub use run::run;
pub use sources::{SourceChanges, Sources, stop_flag};
pub use stage::{StageOutput, WindowStage};
