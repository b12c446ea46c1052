//! `concord`: an etcd-v3-compatible, Raft-replicated coordination store.
//!
//! `concord` with no arguments starts a single member exactly as `etcd` does with
//! its defaults (client 127.0.0.1:2379, peer 2380, data in `./default.concord`).
//! `concord snapshot status|restore ...` inspects and restores snapshot files;
//! `concord status --endpoints ...` shows the cluster at a glance;
//! `concord health [--endpoint URL]` checks one member's `/health` (exit 0 healthy);
//! `concord nodes` lists the members with zone, weight, replica and leader counts;
//! `concord bench WORKLOAD ...` generates load against any etcd-v3 endpoints;
//! `concord bench-streams --workload ...` against any Redis-protocol endpoints;
//! `concord bench-queue --workload ...` against concord's durable-queue API;
//! `concord queue ...` manages durable-queue streams and consumers, publishes,
//! fetches and acknowledges;
//! `concord blob ...` makes and removes buckets, uploads, downloads, lists, copies,
//! deletes and checks blob-store objects (`blob://BUCKET/KEY`);
//! `concord group ...` and `concord register ...` manage the group catalog and
//! the register service.

use clap::Parser;

use concord::server::config::{normalize_args, Config, Flags};

/// mimalloc instead of glibc malloc: profiles of put and range (scripts/profile,
/// docs/benchmarks.md) spent ~17% of the leader's CPU in glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("snapshot") => std::process::exit(concord::cli::snapshot::main(&args[2..])),
        Some("health") => std::process::exit(concord::cli::health::main(&args[2..])),
        Some("status") => std::process::exit(concord::cli::status::main(&args[2..])),
        Some("bench") => std::process::exit(concord::cli::bench::main(&args[2..])),
        Some("bench-log") => std::process::exit(concord::cli::bench_log::main(&args[2..])),
        Some("bench-streams") => std::process::exit(concord::cli::bench_streams::main(&args[2..])),
        Some("bench-queue") => std::process::exit(concord::cli::bench_queue::main(&args[2..])),
        Some("queue") => std::process::exit(concord::cli::queue::main(&args[2..])),
        Some("blob") => std::process::exit(concord::cli::blob::main(&args[2..])),
        Some("nodes") => std::process::exit(concord::cli::nodes::main(&args[2..])),
        Some("group") => std::process::exit(concord::cli::group::group_main(&args[2..])),
        Some("register") => std::process::exit(concord::cli::group::register_main(&args[2..])),
        _ => {}
    }
    let flags = match Flags::try_parse_from(normalize_args(args)) {
        Ok(f) => f,
        Err(e) => e.exit(),
    };
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("concord: {e}");
            std::process::exit(2);
        }
    };
    let level = match config.log_level.as_str() {
        "debug" => "debug",
        "warn" => "warn",
        "error" | "dpanic" | "panic" | "fatal" => "error",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONCORD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},openraft=warn")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if config.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().worker_threads(config.worker_threads);
    // Without tokio's LIFO slot a woken task joins the worker's queue instead of
    // running next on the waker's thread. concord's request path is a chain of
    // hand-offs (gRPC task, Raft core, replication, state-machine worker), and the
    // slot kept each chain on one worker while the other idled and had to be woken
    // to steal: in interleaved pairs on 2 cores (3 members and the load generator,
    // 1000 clients), disabling it gave puts +11% (13,660 vs 12,300 req/s over five
    // pairs, member CPU 4.65 vs 5.30 s per 50k puts) and linearizable ranges +17%
    // (two pairs). The call is tokio-unstable; a build without `--cfg tokio_unstable`
    // keeps the default.
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("concord: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(concord::server::run(config)) {
        tracing::error!("concord stopped: {e}");
        eprintln!("concord: {e}");
        std::process::exit(1);
    }
}
