//! `concord snapshot status FILE` and `concord snapshot restore FILE [flags]`
//! (etcdutl's job for etcd). A snapshot file is what `etcdctl snapshot save` wrote
//! from `Maintenance.Snapshot`: etcd 3.4's format (a bbolt database and its
//! sha256, see `etcd_format`), whether concord or etcd made it, or concord's own
//! earlier format (every table of the state machine, checksummed), told apart by
//! the bbolt magic. A corrupt or truncated file is refused before anything is
//! written.

use std::path::Path;

use crate::etcd_store::state_machine::reset_raft_state;
use crate::server::config::{normalize_args, Config, Flags};
use crate::storage::{decode_snapshot, decode_snapshot_file, snapshot_rows, Backend, HISTORY, RETIRED_LATEST};

const USAGE: &str = "usage: concord snapshot status FILE [-w json]\n       concord snapshot restore FILE [--skip-hash-check] [--name N] [--data-dir D] [--initial-cluster C] [--initial-cluster-token T] [--initial-advertise-peer-urls U]";

/// What `snapshot status` reports.
#[derive(Debug, PartialEq, Eq)]
pub struct SnapshotStatus {
    pub hash: u32,
    pub revision: i64,
    pub total_keys: usize,
    pub total_size: usize,
}

/// For an etcd-format file, what `etcdctl snapshot status` computes (its sha256
/// trailer, when present, is checked first); for concord's earlier format, a CRC32
/// of the file, the revision and the number of live keys.
pub fn status(path: &Path) -> Result<SnapshotStatus, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if crate::etcd_store::etcd_format::is_etcd_snapshot(&data) {
        let fail = |e: crate::etcd_store::etcd_format::FormatError| format!("{}: {e}", path.display());
        let db = crate::etcd_store::etcd_format::strip_trailer(&data, false).map_err(fail)?;
        let s = crate::etcd_store::etcd_format::status(db).map_err(fail)?;
        return Ok(SnapshotStatus {
            hash: s.hash,
            revision: s.revision,
            total_keys: s.total_keys,
            total_size: s.total_size as usize,
        });
    }
    let snapshot = decode_snapshot_file(&data).map_err(|e| format!("{}: {e}", path.display()))?;
    let tables = decode_snapshot(snapshot).map_err(|e| format!("{}: {e}", path.display()))?;
    let revision = tables[0]
        .iter()
        .find(|(k, _)| k.as_slice() == b"mvcc/rev")
        .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(i64::from_be_bytes)
        .unwrap_or(1);
    // Live keys. Snapshots of earlier versions list them in `latest`; this one's
    // history tells them.
    let listed = snapshot_rows(snapshot, &tables, RETIRED_LATEST).map_or(0, Vec::len);
    let total_keys = match snapshot_rows(snapshot, &tables, HISTORY) {
        Some(changes) if listed == 0 => {
            crate::etcd_store::mvcc::records::live_keys(changes.iter().map(|(_, v)| v.as_slice()))
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        _ => listed,
    };
    Ok(SnapshotStatus { hash: crc32fast::hash(&data), revision, total_keys, total_size: data.len() })
}

/// `-w json` / `--write-out json` / `--write-out=json`, etcdctl's spellings.
fn json_flag(args: &[String]) -> bool {
    matches!(args, [w, j] if (w == "-w" || w == "--write-out") && j == "json")
        || matches!(args, [a] if a == "--write-out=json" || a == "-w=json")
}

fn human_size(n: usize) -> String {
    // etcdctl prints sizes with humanize.Bytes (SI units).
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v < 10.0 {
        format!("{v:.1} {}", units[u])
    } else {
        format!("{v:.0} {}", units[u])
    }
}

/// Builds a fresh data dir for member `config.name` of a new cluster seeded with
/// the snapshot's data. The new cluster starts with an empty Raft log.
/// An etcd-format file must carry a matching sha256 trailer unless
/// `skip_hash_check` (etcdctl's flag, for a copied `member/snap/db`).
pub fn restore(path: &Path, config: &Config, skip_hash_check: bool) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let refuse = |e: &dyn std::fmt::Display| format!("refusing {}: {e}", path.display());
    let imported;
    let snapshot = if crate::etcd_store::etcd_format::is_etcd_snapshot(&data) {
        let db = crate::etcd_store::etcd_format::strip_trailer(&data, !skip_hash_check).map_err(|e| refuse(&e))?;
        imported = crate::etcd_store::etcd_format::import(db).map_err(|e| refuse(&e))?;
        imported.as_slice()
    } else {
        decode_snapshot_file(&data).map_err(|e| refuse(&e))?
    };
    if config.data_dir.exists() && std::fs::read_dir(&config.data_dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(format!("data-dir {:?} exists and is not empty", config.data_dir));
    }
    let group_dir = config.data_dir.join("member").join("group-1");
    std::fs::create_dir_all(&group_dir).map_err(|e| format!("cannot create {}: {e}", group_dir.display()))?;
    let backend = Backend::open(&group_dir.join("state.redb")).map_err(|e| e.to_string())?;
    backend.install_snapshot(snapshot).map_err(|e| e.to_string())?;
    crate::etcd_store::mvcc::upgrade::upgrade_layout(&backend).map_err(|e| e.to_string())?;
    reset_raft_state(&backend).map_err(|e| e.to_string())?;
    crate::server::write_bootstrap_identity(config).map_err(|e| e.to_string())?;
    Ok(())
}

/// Runs `concord snapshot ...`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    match (args.first().map(String::as_str), args.get(1)) {
        (Some("status"), Some(file)) if args.len() == 2 || json_flag(&args[2..]) => match status(Path::new(file)) {
            Ok(s) if args.len() > 2 => {
                println!(
                    "{{\"hash\":{},\"revision\":{},\"totalKey\":{},\"totalSize\":{}}}",
                    s.hash, s.revision, s.total_keys, s.total_size
                );
                0
            }
            Ok(s) => {
                println!("{:x}, {}, {}, {}", s.hash, s.revision, s.total_keys, human_size(s.total_size));
                0
            }
            Err(e) => {
                eprintln!("Error: {e}");
                1
            }
        },
        (Some("restore"), Some(file)) => {
            let skip_hash_check = args[2..].iter().any(|a| a == "--skip-hash-check");
            let rest = args[2..].iter().filter(|a| *a != "--skip-hash-check").cloned();
            let flags = std::iter::once("concord".to_string()).chain(rest);
            let flags = match <Flags as clap::Parser>::try_parse_from(normalize_args(flags)) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{e}");
                    return 2;
                }
            };
            let config = match Config::from_flags(flags) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("Error: {e}");
                    return 2;
                }
            };
            match restore(Path::new(file), &config, skip_hash_check) {
                Ok(()) => {
                    println!("restored snapshot {file} into {}", config.data_dir.display());
                    0
                }
                Err(e) => {
                    eprintln!("Error: {e}");
                    1
                }
            }
        }
        _ => {
            eprintln!("{USAGE}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_have_a_status_and_damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kv = crate::proto::mvccpb::KeyValue {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            lease: 0,
        };
        let history = vec![(
            crate::etcd_store::mvcc::keys::rev_key(2, 0).to_vec(),
            crate::etcd_store::mvcc::records::encode_change(true, None, &kv),
        )];
        let meta = vec![(crate::etcd_store::mvcc::META_REV.to_string(), 2i64.to_be_bytes().to_vec())];
        let ours = crate::storage::encode_snapshot_file(&crate::storage::snapshot_from_rows(
            &meta,
            &history,
            &Vec::new(),
            &Vec::new(),
        ));
        let etcd = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/etcd-3.4.23.snapshot")).unwrap();
        let path = dir.path().join("snap");
        for (data, want_rev) in [(&ours, 2), (&etcd, 8)] {
            std::fs::write(&path, data).unwrap();
            assert_eq!(status(&path).unwrap().revision, want_rev);
            for bad in [data[..data.len() - 1].to_vec(), data[..data.len() / 2].to_vec(), {
                let mut b = data.clone();
                b[data.len() / 3] ^= 4;
                b
            }] {
                std::fs::write(&path, &bad).unwrap();
                assert!(
                    status(&path).is_err()
                        || bad.len() % 512 != 32 && crate::etcd_store::etcd_format::is_etcd_snapshot(&bad)
                );
                let config = Config::from_flags(<Flags as clap::Parser>::parse_from([
                    "concord".to_string(),
                    "--data-dir".to_string(),
                    dir.path().join("d").display().to_string(),
                ]))
                .unwrap();
                assert!(restore(&path, &config, false).is_err());
                assert!(!dir.path().join("d").exists(), "a refused restore writes nothing");
            }
        }
    }

    #[test]
    fn sizes_print_like_etcdctl() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(20480), "20 kB");
        assert_eq!(human_size(2_100_000), "2.1 MB");
    }
}
