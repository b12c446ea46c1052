//! `concord bench-log`: durable appends to many Raft groups' logs at once, with the
//! groups sharing one journal (as the groups of a node do, `NodeLog`) and with a
//! journal each, against the same writes to one group in batches. Measures what
//! one fsync covering many groups' appends (group commit across groups) buys.
//! Runs on a scratch directory; no cluster needed.

use clap::Parser;

use crate::consensus::log_store::{measure_appends, AppendRun, JournalLayout};

#[derive(Parser, Debug)]
#[command(name = "concord bench-log", about = "Raft log appends: many groups on one journal vs one group")]
struct Args {
    /// Groups writing at once (and the batch size of the one-group run).
    #[arg(long, default_value_t = 64)]
    groups: u64,
    /// Entries each group appends, one at a time, each waiting for its fsync.
    #[arg(long, default_value_t = 200)]
    entries_per_group: u64,
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Where the scratch directory (`concord-bench-log.PID`, removed afterwards)
    /// goes: put it on the disk to measure.
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// One JSON line per run instead of text.
    #[arg(long)]
    json: bool,
}

pub fn main(args: &[String]) -> i32 {
    let args = match Args::try_parse_from(std::iter::once("concord bench-log".to_string()).chain(args.iter().cloned()))
    {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let scratch = args.dir.join(format!("concord-bench-log.{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&scratch) {
        eprintln!("concord bench-log: scratch directory {}: {e}", scratch.display());
        return 1;
    }
    let code = run(&args, &scratch);
    if let Err(e) = std::fs::remove_dir_all(&scratch) {
        eprintln!("concord bench-log: removing {}: {e}", scratch.display());
    }
    code
}

fn run(args: &Args, scratch: &std::path::Path) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("concord bench-log: {e}");
            return 1;
        }
    };
    let total = args.groups * args.entries_per_group;
    let n = args.groups;
    let runs = [
        (format!("1 group, batches of {n}"), JournalLayout::Shared, 1, total, n),
        (format!("{n} groups, one shared journal"), JournalLayout::Shared, n, args.entries_per_group, 1),
        (format!("{n} groups, a journal each"), JournalLayout::PerGroup, n, args.entries_per_group, 1),
    ];
    for (i, (label, layout, groups, per_group, batch)) in runs.into_iter().enumerate() {
        let dir = scratch.join(format!("run-{i}"));
        let run = runtime.block_on(measure_appends(&dir, layout, groups, per_group, batch, args.value_bytes));
        match run {
            Ok(r) => print_run(&label, &r, args.json),
            Err(e) => {
                eprintln!("concord bench-log: {label}: {e}");
                return 1;
            }
        }
    }
    0
}

fn print_run(label: &str, r: &AppendRun, json: bool) {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let per_s = r.entries as f64 / secs;
    let per_fsync = r.entries as f64 / r.fsyncs.max(1) as f64;
    if json {
        println!(
            "{{\"run\":\"{label}\",\"entries\":{},\"seconds\":{secs:.3},\"entries_per_s\":{per_s:.0},\"fsyncs\":{},\"entries_per_fsync\":{per_fsync:.1}}}",
            r.entries, r.fsyncs
        );
    } else {
        println!(
            "{label}: {} entries in {secs:.2} s, {per_s:.0} entries/s, {} fsyncs ({per_fsync:.1} entries each)",
            r.entries, r.fsyncs
        );
    }
}
