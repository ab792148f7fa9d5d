//! One function per CLI verb, wiring settings, engine and API together: logging, the
//! runtime, listeners, signals and the order of start-up (listen first, then load).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::cli::{
    BenchArgs, CheckArgs, Cli, Command, GenerateArgs, SelftestArgs, ServeArgs, SynthArgs,
    WorkerArgs,
};
use crate::engine::{ChatMessage, Engine, Event, GenRequest, Prompt};
use crate::metrics::Metrics;
use crate::preflight::{self, EXIT_PREFLIGHT};
use crate::settings::{ModelSettings, Settings, SettingsError, WorkerMode, WorkerSettings};

/// Exit code for a configuration mistake (nothing was loaded).
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure at run time.
pub const EXIT_RUNTIME: u8 = 1;

/// Maps an error to its exit code.
pub fn exit_code_for(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<SettingsError>().is_some() {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::from(EXIT_RUNTIME)
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    // Before any thread starts: large buffers get mappings of their own (engine/heap.rs).
    crate::engine::heap::fix_mmap_threshold();
    match cli.command {
        Some(Command::Serve(a)) => serve(a),
        Some(Command::Generate(a)) => generate(a),
        Some(Command::Synth(a)) => synth(a),
        Some(Command::Check(a)) => check(a),
        Some(Command::Selftest(a)) => selftest(a),
        Some(Command::Bench(a)) => bench(a),
        Some(Command::Worker(a)) => worker(a),
        None if crate::settings::runpod_queue_configured() => {
            worker(crate::cli::WorkerArgs::from_env())
        }
        None => serve(crate::cli::ServeArgs::from_env()),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs `f` on a fresh runtime. Its shutdown waits a few seconds at most: a blocking task
/// stuck in an engine that never answers (a self-test that timed out, say) must not keep the
/// process from exiting after SIGTERM.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let out = rt.block_on(f);
    rt.shutdown_timeout(std::time::Duration::from_secs(3));
    Ok(out)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    let settings = Settings::from_serve_args(&args)?;
    settings.model.export_env();
    init_logging(settings.model.log_json);
    // Before anything is downloaded or loaded: every version and device fact, with fixes.
    if let Some(stop) = start_checks(&settings.model) {
        return Ok(stop);
    }
    block_on(serve_async(settings))??;
    Ok(ExitCode::SUCCESS)
}

/// The start-up checks every long-running mode runs before anything is downloaded or
/// loaded; `Some(exit code)` when the start must stop.
fn start_checks(model: &ModelSettings) -> Option<ExitCode> {
    let report = preflight::run(model);
    for line in report.render().lines() {
        tracing::info!(target: "zopilot_gpu::preflight", "{line}");
    }
    if !report.failed() {
        return None;
    }
    eprint!("{}", report.render());
    eprintln!("error: start-up checks failed; nothing was loaded");
    Some(ExitCode::from(EXIT_PREFLIGHT))
}

/// On SIGTERM/SIGINT: stop admitting work, then cancel `token` (listeners and loops).
fn drain_on_signal(engine: Arc<Engine>, token: CancellationToken) {
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!(
            in_flight = engine.in_flight(),
            "shutdown requested; draining"
        );
        engine.drain();
        token.cancel();
    });
}

fn check(a: CheckArgs) -> Result<ExitCode> {
    let model = ModelSettings::from_args(&a.model)?;
    let report = preflight::run(&model);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.failed() {
        ExitCode::from(EXIT_PREFLIGHT)
    } else {
        ExitCode::SUCCESS
    })
}

fn selftest(a: SelftestArgs) -> Result<ExitCode> {
    crate::settings::install_decode_options(&crate::settings::decode_options(&a.decode)?);
    if a.reference {
        let r = block_on(crate::selftest::reference())??;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    init_logging(false);
    let result = block_on(crate::selftest::run(a.cpu))??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        for c in &result.cases {
            let parted = c.tie_gap_at_divergence.map_or(String::new(), |g| {
                format!(", then parted where the CPU's top two were {g:.3} nats apart")
            });
            println!(
                "{} isq={:<4} {}/{} greedy steps agree{parted} (tolerance {} nats) device {:?} cpu {:?}",
                if c.passed { "PASS" } else { "FAIL" },
                c.isq,
                c.agreeing_steps,
                c.steps,
                c.tolerance,
                c.greedy_device,
                c.greedy_cpu
            );
        }
        println!(
            "selftest on {}: {} in {:.1} s",
            result.device,
            if result.passed { "passed" } else { "FAILED" },
            result.seconds
        );
    }
    Ok(if result.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PREFLIGHT)
    })
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (is the port taken? set --port/PORT)"))
}

async fn serve_async(s: Settings) -> Result<()> {
    let engine = Arc::new(Engine::new(
        &s.model,
        s.server.request_timeout,
        Arc::new(Metrics::default()),
    ));
    let state = AppState {
        engine: engine.clone(),
        api_key: s.server.api_key.as_deref().map(Arc::from),
        body_limit: s.server.body_limit,
    };
    let listener = bind(s.server.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, model = %engine.model_name, "listening; loading the model");
    engine.trim_heap_when_idle();
    let token = CancellationToken::new();
    drain_on_signal(engine.clone(), token.clone());
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = s.server.health_listen {
        let health = bind(addr).await?;
        tracing::info!(%addr, "health port listening");
        let router = api::health_app(state.clone());
        servers.spawn(api::serve(
            health,
            router,
            token.clone().cancelled_owned(),
            s.server.shutdown_grace,
        ));
    }
    servers.spawn(api::serve(
        listener,
        api::app(state),
        token.clone().cancelled_owned(),
        s.server.shutdown_grace,
    ));
    {
        let engine = engine.clone();
        let model = s.model.clone();
        let selftest = s.server.selftest;
        // Loading failures are reported through /ping and /health; the server stays up.
        tokio::spawn(async move {
            if selftest {
                match crate::selftest::run(false).await {
                    Ok(r) if r.passed => {
                        tracing::info!(seconds = r.seconds, "GPU self-test passed")
                    }
                    Ok(r) => {
                        let why = format!(
                            "GPU self-test failed: {}",
                            serde_json::to_string(&r.cases).unwrap_or_default()
                        );
                        tracing::error!("{why}");
                        return engine.fail(why);
                    }
                    // A self-test that cannot run proves nothing either way; loading the
                    // model will tell. Only wrong numbers stop the start.
                    Err(e) => tracing::warn!("GPU self-test could not run: {e:#}; loading anyway"),
                }
            }
            let _ = engine.load(&model).await;
        });
    }
    while let Some(r) = servers.join_next().await {
        r.context("server task")??;
    }
    tracing::info!("stopped");
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<ExitCode> {
    let model = ModelSettings::from_args(&a.model)?;
    model.export_env();
    init_logging(model.log_json);
    block_on(async move {
        let engine = Arc::new(Engine::new(
            &model,
            std::time::Duration::from_secs(24 * 3600),
            Arc::new(Metrics::default()),
        ));
        engine.load(&model).await?;
        let mut messages = Vec::new();
        if let Some(system) = a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: a.prompt,
        });
        let req = GenRequest {
            prompt: Prompt::Chat(messages),
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_p: None,
            top_k: None,
            stop: vec![],
            decoding: Default::default(),
        };
        let mut g = engine.generate(req).await?;
        let mut stdout = std::io::stdout();
        while let Some(ev) = g.events.recv().await {
            match ev {
                Event::Text { text, .. } => {
                    stdout.write_all(text.as_bytes())?;
                    stdout.flush()?;
                }
                Event::Done {
                    finish_reason,
                    usage,
                } => {
                    writeln!(stdout)?;
                    eprintln!(
                        "{}",
                        serde_json::json!({"finish_reason": finish_reason, "usage": usage})
                    );
                }
                Event::Error(e) => return Err(e.into()),
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}

fn worker(a: WorkerArgs) -> Result<ExitCode> {
    let s = WorkerSettings::from_args(&a)?;
    s.model.export_env();
    init_logging(s.model.log_json);
    if let Some(endpoint) = &s.endpoint_id {
        tracing::info!(endpoint_id = %endpoint, "RunPod endpoint");
    }
    if let Some(stop) = start_checks(&s.model) {
        return Ok(stop);
    }
    block_on(async move {
        let engine = Arc::new(Engine::new(
            &s.model,
            std::time::Duration::from_secs(3600),
            Arc::new(Metrics::default()),
        ));
        let state = AppState {
            engine: engine.clone(),
            api_key: None,
            body_limit: 64 << 20,
        };
        engine.trim_heap_when_idle();
        let token = CancellationToken::new();
        drain_on_signal(engine.clone(), token.clone());
        if let Some(addr) = s.health_listen {
            let listener = bind(addr).await?;
            let router = api::health_app(state.clone());
            tokio::spawn(api::serve(
                listener,
                router,
                token.clone().cancelled_owned(),
                s.shutdown_grace,
            ));
        }
        engine.load(&s.model).await?;
        let router = api::app(state);
        match s.mode {
            WorkerMode::TestInput(job) => {
                let result = crate::runpod::run_test_input(router, job).await;
                println!("{}", serde_json::to_string_pretty(&result)?);
                Ok(if result.get("error").is_some() {
                    ExitCode::from(EXIT_RUNTIME)
                } else {
                    ExitCode::SUCCESS
                })
            }
            WorkerMode::Server(server) => {
                crate::runpod::run(
                    server,
                    engine,
                    router,
                    token,
                    s.shutdown_grace,
                    s.aggregate_stream,
                )
                .await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    })?
}

fn bench(a: BenchArgs) -> Result<ExitCode> {
    let model = ModelSettings::from_args(&a.model)?;
    model.export_env();
    init_logging(model.log_json);
    if a.concurrency.is_empty()
        || a.concurrency.contains(&0)
        || a.max_tokens == 0
        || a.prompt_tokens == 0
        || (a.long_prompt_tokens > 0 && a.long_prompts == 0)
    {
        return Err(SettingsError(
            "--concurrency levels, --max-tokens, --prompt-tokens (and, with \
             --long-prompt-tokens, --long-prompts) must be >= 1"
                .into(),
        )
        .into());
    }
    let opts = crate::bench::BenchOptions {
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        concurrency: a.concurrency,
        url: a.url,
        api_key: a.api_key,
        bandwidth_gbs: a.bandwidth_gbs,
        model_named: a.model.model.is_some() || a.model.model_name.is_some(),
        distinct_prompts: a.distinct_prompts,
        long_prompt_tokens: a.long_prompt_tokens,
        long_prompts: a.long_prompts,
    };
    let report = block_on(crate::bench::run(model, opts))??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(ExitCode::SUCCESS)
}

fn synth(a: SynthArgs) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let summary = crate::synth::write(a.preset, a.layers, a.seed, a.quantized.is_some(), &a.out)?;
    println!(
        "{}",
        serde_json::json!({"out": a.out, "seconds": started.elapsed().as_secs_f64(), "summary": summary})
    );
    Ok(ExitCode::SUCCESS)
}
