//! `concord bench-log` runs its three layouts and reports each (a small run).

use std::process::Command;

#[test]
fn bench_log_reports_the_three_layouts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["bench-log", "--groups", "4", "--entries-per-group", "5", "--json", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run concord bench-log");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, run) in
        lines.iter().zip(["1 group, batches of 4", "4 groups, one shared journal", "4 groups, a journal each"])
    {
        assert!(line.contains(&format!("\"run\":\"{run}\"")) && line.contains("\"entries\":20"), "{line}");
    }
    // One entry per fsync with a journal each; the one-group run fsyncs once per batch.
    assert!(lines[2].contains("\"fsyncs\":20"), "{}", lines[2]);
    assert!(lines[0].contains("\"fsyncs\":5"), "{}", lines[0]);
    // The scratch directory is gone.
    assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0);
}
