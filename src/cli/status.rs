//! `concord status`: the cluster at a glance (etcdctl's `endpoint status -w table`
//! plus role, health, lag and alarms), optionally refreshed with `--watch`.

use std::time::Duration;

use clap::Parser;

use crate::server::cluster_view::{cluster_view, table};

#[derive(Parser, Debug)]
#[command(name = "concord status", about = "Show every member's role, health, Raft indexes, lag, size and alarms")]
pub struct StatusArgs {
    /// Comma-separated client endpoints; any one that answers is enough.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Refresh until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval with --watch, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub interval_ms: u64,
    /// Per-request timeout, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Output format: table or json.
    #[arg(short = 'w', long = "write-out", default_value = "table")]
    pub write_out: String,
}

/// Runs `concord status ...`; returns the process exit code (1 when the cluster
/// cannot be reached or a member is unhealthy, for scripts).
pub fn main(args: &[String]) -> i32 {
    let args =
        match StatusArgs::try_parse_from(std::iter::once("concord status".to_string()).chain(args.iter().cloned())) {
            Ok(a) => a,
            Err(e) => e.exit(),
        };
    if args.write_out != "table" && args.write_out != "json" {
        eprintln!("Error: unknown --write-out {:?} (table or json)", args.write_out);
        return 2;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: {e}");
            return 1;
        }
    };
    runtime.block_on(async {
        loop {
            let view = cluster_view(&args.endpoints, Duration::from_millis(args.timeout_ms)).await;
            let ok = view.error.is_none() && view.members.iter().all(|m| m.healthy);
            if args.watch {
                // Clear the screen and home the cursor between refreshes.
                print!("\x1b[2J\x1b[H");
            }
            if args.write_out == "json" {
                println!("{}", serde_json::to_string(&view).unwrap_or_default());
            } else {
                print!("{}", table(&view));
            }
            if !args.watch {
                return if ok { 0 } else { 1 };
            }
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
    })
}
