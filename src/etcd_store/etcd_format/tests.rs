use super::*;
use crate::storage::{decode_snapshot, Backend};

fn fixture() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/etcd-3.4.23.snapshot")).unwrap()
}

fn bucket_rows(db: &[u8], name: &str) -> Rows {
    rows(&bbolt::read(db).unwrap(), name).cloned().unwrap_or_default()
}

/// The fixture: made with etcd 3.4.23 by `put foo bar; put foo bar2; put a 1;
/// del a; put big <6000 x>; lease grant 600; put leased v --lease; role add r1;
/// role grant-permission r1 readwrite foo; user add u1:pw; user grant-role u1 r1;
/// put c 3; compact 3; snapshot save`.
#[test]
fn the_etcd_fixture_imports_with_history_leases_and_auth() {
    let file = fixture();
    assert!(is_etcd_snapshot(&file));
    let db = strip_trailer(&file, true).unwrap();
    // What `etcdctl snapshot status -w json` printed for it.
    let st = status(db).unwrap();
    assert_eq!(st, Status { hash: 4283986280, revision: 8, total_keys: 15, total_size: 49152 });

    let snap = import(db).unwrap();
    let tables = decode_snapshot(&snap).unwrap();
    let meta: HashMap<String, Vec<u8>> =
        tables[0].iter().map(|(k, v)| (String::from_utf8(k.clone()).unwrap(), v.clone())).collect();
    assert_eq!(meta[META_REV], 8i64.to_be_bytes());
    assert_eq!(meta[META_COMPACT], 3i64.to_be_bytes());
    assert_eq!(meta[META_REVISION], 4u64.to_be_bytes());
    assert!(!meta.contains_key(META_ENABLED));
    assert!(meta.contains_key("auth/user/u1") && meta.contains_key("auth/role/r1"));
    let history: Vec<_> =
        tables[2].iter().map(|(k, v)| (decode_rev_key(k).unwrap(), decode_change(v).unwrap())).collect();
    assert_eq!(history.len(), 6);
    let foo = &history[0];
    assert_eq!(
        (foo.0, foo.1.kv.key.as_slice(), foo.1.kv.create_revision, foo.1.kv.version),
        ((3, 0), &b"foo"[..], 2, 2)
    );
    let del = &history[2];
    assert_eq!((del.0, del.1.put, del.1.prev), ((5, 0), false, Some((4, 0))));
    assert_eq!(tables[3].len(), 1, "one lease");
    let lease_id = i64::from_be_bytes(tables[3][0].0.clone().try_into().unwrap());
    let rec = LeaseRecord::decode(lease_id, &tables[3][0].1).unwrap();
    assert_eq!(rec.ttl_s, 600);
    assert_eq!(tables[4], vec![(lease_key(lease_id, b"leased"), vec![])]);
}

#[test]
fn an_imported_etcd_snapshot_exports_the_same_buckets() {
    let file = fixture();
    let db = strip_trailer(&file, true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::open(&dir.path().join("s.redb")).unwrap();
    backend.install_snapshot(&import(db).unwrap()).unwrap();
    let out = export(&backend.begin_read().unwrap()).unwrap();
    for name in ["key", "lease", "auth", "authUsers", "authRoles", "cluster", "alarm"] {
        assert_eq!(bucket_rows(&out, name), bucket_rows(db, name), "bucket {name}");
    }
    let compact =
        |d: &[u8]| bucket_rows(d, "meta").into_iter().filter(|(k, _)| k.ends_with(b"CompactRev")).collect::<Rows>();
    assert_eq!(compact(&out), compact(db));
    assert_eq!(status(&out).unwrap().revision, 8);
    assert_eq!(status(&out).unwrap().total_keys, status(db).unwrap().total_keys - 1, "no member in the test store");
}

#[test]
fn damaged_etcd_snapshots_are_refused() {
    let file = fixture();
    assert!(strip_trailer(&file[..file.len() - 1], true).is_err());
    assert!(strip_trailer(&file[..file.len() - 32], true).is_err());
    let mut flipped = file.clone();
    flipped[5000] ^= 1;
    assert!(matches!(strip_trailer(&flipped, true), Err(FormatError::Corrupt(m)) if m.contains("sha256")));
    let db = &file[..file.len() - 32];
    for cut in [0, 100, 4096, db.len() - 4096] {
        assert!(import(&db[..cut]).is_err(), "cut at {cut}");
    }
    for at in (0..db.len()).step_by(3) {
        let mut bad = db.to_vec();
        bad[at] ^= 0x5a;
        let _ = import(&bad);
        let _ = status(&bad);
    }
}

/// Structured damage past the meta checksum (which is recomputed): random values
/// written over page headers and element tables of the fixture and of a written
/// file with branches and overflow pages. Every outcome is a value, never a panic.
#[test]
fn mutated_pages_behind_valid_metas_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let fixture = fixture();
    let rows: Rows = (0..2000u32).map(|i| (i.to_be_bytes().to_vec(), vec![3; (i % 97) as usize])).collect();
    let written = bbolt::write(&[
        bbolt::Bucket { name: b"key".to_vec(), rows },
        bbolt::Bucket { name: b"meta".to_vec(), rows: vec![(b"x".to_vec(), vec![9; 10_000])] },
    ]);
    for base in [&fixture[..fixture.len() - 32], &written[..]] {
        for _ in 0..3000 {
            let mut db = base.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let page = rng.random_range(0..db.len() / bbolt::PAGE_SIZE);
                let at = page * bbolt::PAGE_SIZE + rng.random_range(0..64);
                let v: u64 = match rng.random_range(0..4) {
                    0 => rng.random(),
                    1 => rng.random_range(0..16),
                    2 => u64::from(u32::MAX),
                    _ => rng.random_range(0..db.len() as u64 / 4096 + 2),
                };
                let width = [1, 2, 4, 8][rng.random_range(0..4)];
                let end = (at + width).min(db.len());
                db[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            bbolt::fix_meta_checksums(&mut db);
            let _ = status(&db);
            let _ = import(&db);
        }
    }
}

fn etcd_db(key_rows: Vec<(i64, i64, bool, KeyValue)>, meta: Rows) -> Vec<u8> {
    let rows = key_rows.into_iter().map(|(m, s, t, kv)| (rev_bytes(m, s, t), kv.encode_to_vec())).collect();
    bbolt::write(&[bbolt::Bucket { name: b"key".to_vec(), rows }, bbolt::Bucket { name: b"meta".to_vec(), rows: meta }])
}

fn kv(key: &str, create: i64, m: i64, version: i64) -> KeyValue {
    KeyValue { key: key.into(), create_revision: create, mod_revision: m, version, ..Default::default() }
}

#[test]
fn an_unfinished_compaction_is_finished_and_inconsistent_histories_are_refused() {
    let tomb = KeyValue { key: b"d".to_vec(), ..Default::default() };
    let rows = vec![
        (2, 0, false, kv("k", 2, 2, 1)),
        (3, 0, false, kv("k", 2, 3, 2)),
        (4, 0, false, kv("d", 4, 4, 1)),
        (5, 0, true, tomb.clone()),
        (6, 0, false, kv("k", 2, 6, 3)),
    ];
    let meta = vec![(b"scheduledCompactRev".to_vec(), rev_bytes(5, 0, false))];
    let tables = decode_snapshot(&import(&etcd_db(rows.clone(), meta.clone())).unwrap()).unwrap();
    let revs: Vec<_> = tables[2].iter().map(|(k, _)| decode_rev_key(k).unwrap()).collect();
    assert_eq!(revs, vec![(3, 0), (6, 0)], "what etcd's compaction at 5 keeps");
    assert_eq!(decode_change(&tables[2][1].1).unwrap().prev, Some((3, 0)));

    let bad_cases = [
        vec![(2, 0, true, tomb.clone())],
        vec![(2, 0, false, kv("k", 2, 2, 1)), (3, 0, false, kv("k", 2, 3, 5))],
        vec![(2, 0, false, kv("k", 2, 2, 1)), (3, 0, false, kv("k", 3, 3, 2))],
        vec![(2, 0, false, kv("k", 2, 3, 1))],
        vec![(7, 0, false, kv("k", 2, 7, 2))],
        vec![(2, 1 << 40, false, kv("k", 2, 2, 1))],
    ];
    for (i, rows) in bad_cases.into_iter().enumerate() {
        assert!(import(&etcd_db(rows, Vec::new())).is_err(), "case {i} accepted");
    }
}

#[test]
fn the_auth_flag_and_revision_round_trip() {
    let root = User { name: b"root".to_vec(), roles: vec!["root".into()], ..Default::default() };
    let db = bbolt::write(&[
        bbolt::Bucket { name: b"key".to_vec(), rows: vec![] },
        bbolt::Bucket { name: b"meta".to_vec(), rows: vec![] },
        bbolt::Bucket {
            name: b"auth".to_vec(),
            rows: vec![(b"authRevision".to_vec(), 7u64.to_be_bytes().to_vec()), (b"enabled".to_vec(), vec![1])],
        },
        bbolt::Bucket { name: b"authUsers".to_vec(), rows: vec![(b"root".to_vec(), root.encode_to_vec())] },
        bbolt::Bucket {
            name: b"authRoles".to_vec(),
            rows: vec![(b"root".to_vec(), Role { name: b"root".to_vec(), ..Default::default() }.encode_to_vec())],
        },
    ]);
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::open(&dir.path().join("s.redb")).unwrap();
    backend.install_snapshot(&import(&db).unwrap()).unwrap();
    let txn = backend.begin_read().unwrap();
    let auth = AuthState::load(&txn.open_table(META).unwrap()).unwrap();
    assert!(auth.enabled);
    assert_eq!(auth.revision, 6);
    assert!(auth.is_root("root"));
    let out = export(&txn).unwrap();
    for name in ["auth", "authUsers", "authRoles"] {
        assert_eq!(bucket_rows(&out, name), bucket_rows(&db, name), "bucket {name}");
    }
    // A user record filed under another name is refused.
    let mislabeled = bbolt::write(&[
        bbolt::Bucket { name: b"key".to_vec(), rows: vec![] },
        bbolt::Bucket { name: b"meta".to_vec(), rows: vec![] },
        bbolt::Bucket { name: b"authUsers".to_vec(), rows: vec![(b"other".to_vec(), root.encode_to_vec())] },
    ]);
    assert!(import(&mislabeled).is_err());
}

#[test]
fn revision_keys_round_trip() {
    for (m, s, t) in [(1, 0, false), (300, 2, true)] {
        assert_eq!(parse_rev_bytes(&rev_bytes(m, s, t)), Some((m, s, t)));
    }
    assert_eq!(parse_rev_bytes(b"short"), None);
    let mut bad = rev_bytes(1, 0, false);
    bad[8] = b'-';
    assert_eq!(parse_rev_bytes(&bad), None);
}
