//! mbt-edge: capture -> window -> features -> model -> events -> publish.
//!
//! The binary (`main.rs`) is a thin command line over these stages; tests drive them
//! directly and through the binary.

pub mod capture;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod events;
pub mod evidence;
pub mod features;
pub mod media;
pub mod model;
pub mod npy;
pub mod publish;
pub mod record;
pub mod service;
pub mod telemetry;
pub mod web;
pub mod window;
