//! zopilot-gpu: one binary that serves Mixtral-8x7B-Instruct, quantized in situ to 4 bits,
//! on one GPU. The corridor is `settings` → `preflight` → `engine` → `api` / `runpod`;
//! `quant_cache` is what a load reads instead of bf16 (the
//! quantized-weights cache, GGUF models); `cli` holds the raw flags, `commands` wires the rooms per CLI verb, `metrics` is shared by
//! engine and api, and `synth`, `selftest` and `bench` are verbs of their own on the same
//! engine (docs/serving.md draws the map).

pub mod api;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod engine;
pub mod metrics;
pub mod preflight;
pub mod quant_cache;
pub mod runpod;
pub mod selftest;
pub mod settings;
pub mod synth;
