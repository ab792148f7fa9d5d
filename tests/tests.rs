//! Integration tests, one binary: `support` builds servers around the tiny synthetic
//! Mixtral (loaded with ISQ Q4K on the CPU); `http_api` drives them through real HTTP;
//! `process` runs the built binary (signals, exit codes, the CLI, the openai client);
//! `runpod` runs the queue worker against a job-server emulator; `decoding` checks prompt ids
//! against transformers and the OpenAI decoding controls; `quant_cache` the quantized-weights
//! cache and GGUF models through the binary.

mod decoding;
mod http_api;
mod process;
mod quant_cache;
mod runpod;
mod support;
