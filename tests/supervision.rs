//! A member whose long-lived task panics stops loudly instead of serving without
//! it (see `src/supervisor.rs`): the panic is injected with `CONCORD_INJECT_PANIC`.

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use concord_testkit::{free_port, single_member_command};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

/// Runs a single member with a panic injected into `task`; returns its exit status
/// and its log, or fails if it still runs after 60 s.
fn run_with_panic_in(task: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = single_member_command(&bin(), "solo", dir.path(), free_port(), free_port())
        .env("CONCORD_INJECT_PANIC", task)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start concord");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for concord") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the member kept running for 60 s with a panicked {task}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, log.join().expect("stderr reader"))
}

#[test]
fn a_panicking_background_task_stops_the_member_and_names_the_task() {
    for task in ["lessor", "watch-feed", "lease-forwarder"] {
        let (status, log) = run_with_panic_in(task);
        assert!(!status.success(), "{task}: the member exited cleanly after a panic:\n{log}");
        let line = format!("background task {task} panicked");
        assert!(log.contains(&line), "{task}: no log line naming the task:\n{log}");
    }
}
