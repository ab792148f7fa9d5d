//! zopilot-gpu: one binary that serves Mixtral-8x7B-Instruct, quantized in situ to 4 bits,
//! on one GPU. The corridor is settings → engine → api; `commands` wires them per CLI verb.

pub mod api;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod engine;
pub mod metrics;
pub mod preflight;
pub mod runpod;
pub mod selftest;
pub mod settings;
pub mod synth;
