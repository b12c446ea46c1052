//! Table-driven MVCC cases. Expected values were worked out from etcd 3.4's
//! semantics (and cross-checked end to end by the etcdctl golden test).

use super::*;
use crate::etcd_store::mvcc::index::KeyIndex;
use crate::proto::etcdserverpb::{compare::CompareResult, compare::CompareTarget, compare::TargetUnion, RequestOp};
use crate::storage::Backend;
use redb::ReadableTableMetadata;

struct Store {
    _dir: tempfile::TempDir,
    backend: Backend,
    /// Kept up to date by the writes, as the state machine's is.
    index: Arc<KeyIndex>,
}

impl Store {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backend = Backend::open(&dir.path().join("sm.db")).unwrap();
        let index = Arc::new(KeyIndex::open(&backend.begin_read().unwrap()).unwrap());
        Store { _dir: dir, backend, index }
    }

    fn view(&self) -> ReadView {
        ReadView::new(&self.backend.begin_read().unwrap(), &self.index).unwrap()
    }

    /// The index a restart would build from the file.
    fn rebuilt_index(&self) -> Arc<KeyIndex> {
        Arc::new(KeyIndex::open(&self.backend.begin_read().unwrap()).unwrap())
    }

    fn write<T>(&self, f: impl FnOnce(&mut Writer) -> Result<T>) -> Result<T> {
        let txn = self.backend.begin_apply().unwrap();
        let out = {
            let mut w = Writer::new(&txn, &self.index).unwrap();
            let out = f(&mut w);
            w.finish().unwrap();
            out
        };
        txn.commit().unwrap();
        out
    }

    fn put(&self, k: &str, v: &str) -> Rev {
        let req = PutRequest { key: k.into(), value: v.into(), ..Default::default() };
        self.write(|w| w.put(&req)).unwrap().header.unwrap().revision
    }

    fn del(&self, k: &str, end: &str) -> i64 {
        let req = DeleteRangeRequest { key: k.into(), range_end: end.into(), ..Default::default() };
        self.write(|w| w.delete_range(&req)).unwrap().deleted
    }

    fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        ReadView::new(&self.backend.begin_read().unwrap(), &self.index)?.range(&req)
    }

    fn keys(&self, req: RangeRequest) -> Vec<String> {
        self.range(req).unwrap().kvs.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect()
    }

    fn rev(&self) -> Rev {
        self.view().current_rev()
    }
}

fn rr(key: &str, end: &str) -> RangeRequest {
    RangeRequest { key: key.into(), range_end: end.into(), ..Default::default() }
}

#[test]
fn revisions_versions_and_recreation() {
    let s = Store::new();
    assert_eq!(s.rev(), 1, "a fresh store is at revision 1");
    // (operation, expected revision after, expected (create, mod, version) of "k" or None)
    type Case = (&'static str, Rev, Option<(Rev, Rev, i64)>);
    let cases: [Case; 6] = [
        ("put k v1", 2, Some((2, 2, 1))),
        ("put k v2", 3, Some((2, 3, 2))),
        ("put other x", 4, Some((2, 3, 2))),
        ("del k", 5, None),
        ("del k", 5, None),
        ("put k v3", 6, Some((6, 6, 1))),
    ];
    for (op, want_rev, want_kv) in cases {
        let parts: Vec<&str> = op.split(' ').collect();
        match parts[0] {
            "put" => {
                s.put(parts[1], parts[2]);
            }
            "del" => {
                s.del(parts[1], "");
            }
            _ => unreachable!(),
        }
        assert_eq!(s.rev(), want_rev, "after {op}");
        let got = s.range(rr("k", "")).unwrap().kvs.first().map(|kv| (kv.create_revision, kv.mod_revision, kv.version));
        assert_eq!(got, want_kv, "after {op}");
    }
    let old = s.range(RangeRequest { revision: 3, ..rr("k", "") }).unwrap();
    assert_eq!(old.kvs[0].value, b"v2");
    assert_eq!(old.header.unwrap().revision, 6, "header carries the current revision");
    assert!(s.range(RangeRequest { revision: 5, ..rr("k", "") }).unwrap().kvs.is_empty());
    assert!(matches!(s.range(RangeRequest { revision: 7, ..rr("k", "") }), Err(MvccError::FutureRev)));
}

#[test]
fn range_options_table() {
    let s = Store::new();
    for (k, v) in [("a", "3"), ("b", "1"), ("c", "2"), ("c", "2b"), ("d", "0"), ("e\0x", "z")] {
        s.put(k, v);
    }
    // a@2 b@3 c@4,5 (version 2) d@6 "e\0x"@7
    let cases: Vec<(&str, RangeRequest, Vec<&str>, i64, bool)> = vec![
        ("single", rr("b", ""), vec!["b"], 1, false),
        ("missing", rr("zz", ""), vec![], 0, false),
        ("interval", rr("b", "d"), vec!["b", "c"], 2, false),
        ("from key", rr("c", "\0"), vec!["c", "d", "e\0x"], 3, false),
        ("all", rr("\0", "\0"), vec!["a", "b", "c", "d", "e\0x"], 5, false),
        ("prefix e", rr("e", "f"), vec!["e\0x"], 1, false),
        ("empty interval", rr("d", "b"), vec![], 0, false),
        ("limit", RangeRequest { limit: 2, ..rr("a", "\0") }, vec!["a", "b"], 5, true),
        ("limit exact", RangeRequest { limit: 5, ..rr("a", "\0") }, vec!["a", "b", "c", "d", "e\0x"], 5, false),
        (
            "sort value desc",
            RangeRequest { sort_order: 2, sort_target: 4, ..rr("a", "\0") },
            vec!["e\0x", "a", "c", "b", "d"],
            5,
            false,
        ),
        (
            "sort version (asc implied)",
            RangeRequest { sort_target: 1, ..rr("a", "\0") },
            vec!["a", "b", "d", "e\0x", "c"],
            5,
            false,
        ),
        (
            "sort mod desc limit",
            RangeRequest { sort_order: 2, sort_target: 3, limit: 2, ..rr("a", "\0") },
            vec!["e\0x", "d"],
            5,
            true,
        ),
        ("sort key desc", RangeRequest { sort_order: 2, ..rr("a", "\0") }, vec!["e\0x", "d", "c", "b", "a"], 5, false),
        ("min mod", RangeRequest { min_mod_revision: 5, ..rr("a", "\0") }, vec!["c", "d", "e\0x"], 5, false),
        ("max mod", RangeRequest { max_mod_revision: 3, ..rr("a", "\0") }, vec!["a", "b"], 5, false),
        ("min create", RangeRequest { min_create_revision: 4, ..rr("a", "\0") }, vec!["c", "d", "e\0x"], 5, false),
        ("max create", RangeRequest { max_create_revision: 4, ..rr("a", "\0") }, vec!["a", "b", "c"], 5, false),
        ("filter with limit", RangeRequest { min_create_revision: 3, limit: 1, ..rr("a", "\0") }, vec!["b"], 5, true),
        ("count only", RangeRequest { count_only: true, ..rr("a", "\0") }, vec![], 5, false),
        ("historical", RangeRequest { revision: 4, ..rr("a", "\0") }, vec!["a", "b", "c"], 3, false),
        ("historical limit", RangeRequest { revision: 4, limit: 1, ..rr("a", "\0") }, vec!["a"], 3, true),
    ];
    for (name, req, want, count, more) in cases {
        let resp = s.range(req.clone()).unwrap();
        let got: Vec<String> = resp.kvs.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect();
        assert_eq!(got, want, "{name}");
        assert_eq!(resp.count, count, "{name}: count");
        assert_eq!(resp.more, more, "{name}: more");
    }
    let ko = s.range(RangeRequest { keys_only: true, ..rr("a", "") }).unwrap();
    assert!(ko.kvs[0].value.is_empty());
    assert_eq!(s.range(rr("c", "")).unwrap().kvs[0].version, 2);
}

#[test]
fn compaction_table() {
    let s = Store::new();
    s.put("a", "1"); // 2
    s.put("a", "2"); // 3
    s.put("b", "1"); // 4
    s.del("b", ""); // 5
    s.put("c", "1"); // 6
                     // (compact to, expected error, reads: (revision, keys or error))
    let compact = |rev: Rev| s.write(|w| w.compact(rev)).map(|_| ());
    assert!(matches!(compact(7), Err(MvccError::FutureRev)));
    compact(5).unwrap();
    assert!(matches!(compact(5), Err(MvccError::Compacted)));
    assert!(matches!(compact(4), Err(MvccError::Compacted)));
    let reads: [(Rev, std::result::Result<Vec<&str>, &str>); 4] =
        [(4, Err("compacted")), (5, Ok(vec!["a"])), (6, Ok(vec!["a", "c"])), (0, Ok(vec!["a", "c"]))];
    for (rev, want) in reads {
        let got = s.range(RangeRequest { revision: rev, ..rr("\0", "\0") });
        match (got, want) {
            (Ok(resp), Ok(keys)) => {
                let got: Vec<String> = resp.kvs.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect();
                assert_eq!(got, keys, "rev {rev}");
            }
            (Err(MvccError::Compacted), Err("compacted")) => {}
            (got, want) => panic!("rev {rev}: got {got:?}, want {want:?}"),
        }
    }
    assert_eq!(s.range(RangeRequest { revision: 5, ..rr("a", "") }).unwrap().kvs[0].value, b"2");
    // Physical effect: history keeps exactly the newest non-deleted version of a and c.
    let txn = s.backend.begin_read().unwrap();
    assert_eq!(txn.open_table(HISTORY).unwrap().len().unwrap(), 2);
    assert_eq!(s.rev(), 6, "compaction does not advance the revision");
}

fn cmp(key: &str, target: CompareTarget, result: CompareResult, v: TargetUnion) -> Compare {
    Compare { key: key.into(), target: target as i32, result: result as i32, target_union: Some(v), range_end: vec![] }
}

fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    }
}

#[test]
fn txn_compares_table() {
    let s = Store::new();
    s.put("k", "v"); // rev 2, version 1
    use CompareResult::*;
    use CompareTarget::*;
    let cases = [
        (cmp("k", Value, Equal, TargetUnion::Value(b"v".to_vec())), true),
        (cmp("k", Value, Greater, TargetUnion::Value(b"a".to_vec())), true),
        (cmp("k", Value, Less, TargetUnion::Value(b"a".to_vec())), false),
        (cmp("k", Version, Equal, TargetUnion::Version(1)), true),
        (cmp("k", Create, Equal, TargetUnion::CreateRevision(2)), true),
        (cmp("k", Mod, NotEqual, TargetUnion::ModRevision(2)), false),
        (cmp("k", Lease, Equal, TargetUnion::Lease(0)), true),
        (cmp("missing", Version, Equal, TargetUnion::Version(0)), true),
        (cmp("missing", Create, Less, TargetUnion::CreateRevision(1)), true),
        (cmp("missing", Value, Equal, TargetUnion::Value(vec![])), false),
        (cmp("missing", Value, NotEqual, TargetUnion::Value(b"x".to_vec())), false),
    ];
    for (c, want) in cases {
        let req = TxnRequest { compare: vec![c.clone()], success: vec![], failure: vec![] };
        let resp = s.view().txn_readonly(&req).unwrap();
        assert_eq!(resp.succeeded, want, "{c:?}");
    }
    // A compare over a range holds only if it holds for every key in it.
    s.put("k2", "v");
    let mut c = cmp("k", Value, Equal, TargetUnion::Value(b"v".to_vec()));
    c.range_end = b"l".to_vec();
    let req = TxnRequest { compare: vec![c.clone()], ..Default::default() };
    assert!(s.view().txn_readonly(&req).unwrap().succeeded);
    s.put("k3", "other");
    assert!(!s.view().txn_readonly(&req).unwrap().succeeded);
}

#[test]
fn txn_writes_share_one_revision_and_see_each_other() {
    let s = Store::new();
    s.put("a", "0"); // 2
    let req = TxnRequest {
        compare: vec![],
        success: vec![
            put_op("a", "1"),
            put_op("b", "1"),
            RequestOp { request: Some(request_op::Request::RequestRange(rr("a", "c"))) },
            RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: b"a".to_vec(),
                    prev_kv: true,
                    ..Default::default()
                })),
            },
        ],
        failure: vec![],
    };
    let resp = s.write(|w| w.txn(&req)).unwrap();
    assert_eq!(resp.header.unwrap().revision, 3);
    assert_eq!(s.rev(), 3, "one revision for the whole txn");
    let Some(response_op::Response::ResponseRange(r)) = &resp.responses[2].response else { panic!() };
    assert_eq!(r.kvs.len(), 2, "reads inside the txn see its writes");
    assert_eq!(r.kvs[0].value, b"1");
    assert_eq!(r.header.as_ref().unwrap().revision, 3);
    let Some(response_op::Response::ResponseDeleteRange(d)) = &resp.responses[3].response else { panic!() };
    assert_eq!(d.prev_kvs[0].value, b"1");
    assert_eq!(s.keys(rr("\0", "\0")), vec!["b"]);
    assert_eq!(s.range(rr("b", "")).unwrap().kvs[0].mod_revision, 3);

    // A failing pre-check changes nothing: ignore_value on a missing key.
    let bad = TxnRequest {
        success: vec![
            put_op("c", "1"),
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"nope".to_vec(),
                    ignore_value: true,
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    assert!(matches!(s.write(|w| w.txn(&bad)), Err(MvccError::KeyNotFound)));
    assert_eq!(s.rev(), 3);
    assert_eq!(s.keys(rr("\0", "\0")), vec!["b"]);

    // Nested txn compares are evaluated before any op of the outer txn runs.
    let nested = TxnRequest {
        success: vec![
            put_op("x", "1"),
            RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    compare: vec![cmp("x", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(0))],
                    success: vec![put_op("y", "seen-x-missing")],
                    failure: vec![put_op("y", "seen-x")],
                })),
            },
        ],
        ..Default::default()
    };
    let resp = s.write(|w| w.txn(&nested)).unwrap();
    assert_eq!(resp.header.unwrap().revision, 4);
    assert_eq!(s.range(rr("y", "")).unwrap().kvs[0].value, b"seen-x-missing");
    let Some(response_op::Response::ResponseTxn(inner)) = &resp.responses[1].response else { panic!() };
    assert_eq!(inner.header, Some(ResponseHeader::default()), "nested txn headers are empty, as etcd's");
}

#[test]
fn put_flags_table() {
    let s = Store::new();
    let put = |p: PutRequest| s.write(|w| w.put(&p));
    assert!(matches!(
        put(PutRequest { key: b"k".to_vec(), ignore_value: true, ..Default::default() }),
        Err(MvccError::KeyNotFound)
    ));
    assert!(matches!(
        put(PutRequest { key: b"k".to_vec(), lease: 5, ..Default::default() }),
        Err(MvccError::LeaseNotFound)
    ));
    assert_eq!(s.rev(), 1, "refused puts change nothing");
    s.put("k", "v1");
    let r = put(PutRequest { key: b"k".to_vec(), ignore_value: true, prev_kv: true, ..Default::default() }).unwrap();
    assert_eq!(r.prev_kv.unwrap().value, b"v1");
    let kv = &s.range(rr("k", "")).unwrap().kvs[0];
    assert_eq!((kv.value.as_slice(), kv.version, kv.mod_revision), (b"v1".as_slice(), 2, 3));
    let r = put(PutRequest { key: b"k".to_vec(), value: b"v2".to_vec(), ..Default::default() }).unwrap();
    assert!(r.prev_kv.is_none(), "prev_kv only when asked");
}

/// HashKV values measured on etcd 3.4.23 (`etcdctl endpoint hashkv`) after the
/// same operations on a fresh single member (revision 1 is the empty store).
#[test]
fn hash_kv_matches_etcd_3_4() {
    enum Op {
        Put(&'static str, &'static str),
        Del(&'static str),
        Compact(Rev),
    }
    use Op::*;
    let cases: Vec<(Vec<Op>, u32)> = vec![
        (vec![Put("a", "1"), Put("b", "2"), Put("c", "3")], 962318141),
        (vec![Put("a", "1"), Put("b", "2"), Put("c", "3"), Compact(3)], 962318141),
        (vec![Put("a", "1"), Put("b", "2"), Del("a"), Put("c", "3")], 878850413),
        // Compaction keeps a@2 (readable at revision 2), yet etcd's hash skips it.
        (vec![Put("a", "1"), Put("b", "2"), Del("a"), Put("c", "3"), Compact(2)], 2496403218),
        (vec![Put("a", "1"), Put("a", "2"), Del("a"), Put("b", "3"), Compact(2)], 1796572501),
        (vec![Put("a", "1"), Put("a", "2"), Del("a"), Put("b", "3"), Compact(3)], 3953290446),
        (vec![Put("a", "1"), Put("b", "2"), Del("a"), Put("a", "3"), Compact(2)], 126654121),
        // A kept version overwritten after the compaction is skipped too (etcd's
        // Keep(rev): only each key's newest version at the hashed revision)...
        (vec![Put("a", "1"), Put("b", "2"), Compact(3), Put("a", "3")], 1107643163),
        (vec![Put("a", "1"), Put("b", "2"), Compact(3), Put("a", "3"), Del("b")], 1468967122),
        // ...unless nothing is live at that revision: then etcd hashes every row.
        (vec![Put("a", "1"), Compact(2), Del("a")], 3520211144),
        (vec![Put("a", "1"), Put("b", "2"), Compact(3), Del("a"), Del("b")], 3647447639),
    ];
    for (i, (ops, want)) in cases.into_iter().enumerate() {
        let s = Store::new();
        for op in ops {
            match op {
                Put(k, v) => {
                    s.put(k, v);
                }
                Del(k) => {
                    s.del(k, "");
                }
                Compact(r) => {
                    s.write(|w| w.compact(r)).unwrap();
                }
            }
        }
        let view = s.view();
        assert_eq!(view.hash_kv(0).unwrap().0, want, "case {i}");
    }
}

/// The store against a model that keeps every revision's whole state: random puts,
/// range deletes, two-key txns and compactions over a few keys; after each step,
/// every readable revision's range, every event's `prev_kv` and the compacted
/// revisions' refusal must match the model. The seed is printed on failure.
#[test]
fn history_reads_match_a_model_of_every_revision() {
    use rand::{Rng, SeedableRng};
    type State = BTreeMap<Vec<u8>, KeyValue>;
    for seed in 0..40u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let s = Store::new();
        // states[r] = the whole state at revision r (states[0] unused).
        let mut states: Vec<State> = vec![State::new(), State::new()];
        let mut compacted: Rev = 0;
        let key = |rng: &mut rand::rngs::StdRng| vec![b'a' + rng.random_range(0..6u8)];
        for step in 0..120 {
            let ctx = format!("seed {seed} step {step}");
            let mut next = states.last().unwrap().clone();
            let rev = states.len() as Rev;
            let put = |next: &mut State, k: Vec<u8>, v: Vec<u8>| {
                let (create_revision, version) = next.get(&k).map_or((rev, 1), |p| (p.create_revision, p.version + 1));
                let kv = KeyValue { key: k.clone(), value: v, create_revision, mod_revision: rev, version, lease: 0 };
                next.insert(k, kv);
            };
            match rng.random_range(0..10) {
                0..=4 => {
                    let (k, v) = (key(&mut rng), format!("v{step}").into_bytes());
                    s.write(|w| w.put(&PutRequest { key: k.clone(), value: v.clone(), ..Default::default() })).unwrap();
                    put(&mut next, k, v);
                }
                5 | 6 => {
                    let (a, b) = (key(&mut rng), key(&mut rng));
                    let (lo, hi) = (a.clone().min(b.clone()), a.max(b));
                    let end = if rng.random_bool(0.5) { Vec::new() } else { hi.clone() };
                    s.write(|w| {
                        w.delete_range(&DeleteRangeRequest {
                            key: lo.clone(),
                            range_end: end.clone(),
                            ..Default::default()
                        })
                    })
                    .unwrap();
                    let range = keys::KeyRange::new(&lo, &end);
                    next.retain(|k, _| !range.contains(k));
                }
                7 | 8 => {
                    let (a, b) = (key(&mut rng), key(&mut rng));
                    if a != b {
                        let req = TxnRequest {
                            success: vec![put_op_bytes(&a, b"t"), del_op_bytes(&b)],
                            ..Default::default()
                        };
                        s.write(|w| w.txn(&req)).unwrap();
                        put(&mut next, a, b"t".to_vec());
                        next.remove(&b);
                    }
                }
                _ => {
                    let current = states.len() as Rev - 1;
                    if current > compacted + 1 {
                        let at = rng.random_range(compacted + 1..=current);
                        s.write(|w| w.compact(at)).unwrap();
                        compacted = at;
                    }
                }
            }
            if next != *states.last().unwrap() {
                states.push(next);
            }
            let current = states.len() as Rev - 1;
            assert_eq!(s.rev(), current, "{ctx}");
            let rebuilt_index = s.rebuilt_index();
            for k in b'a'..b'g' {
                let want =
                    states.last().unwrap().get(&vec![k]).map(|kv| (kv.create_revision, kv.version, kv.mod_revision));
                for index in [&s.index, &rebuilt_index] {
                    let got = index.newest(&[k]).map(|(at, h)| (h.create_revision, h.version, at.0));
                    assert_eq!(got, want, "{ctx} newest of {}", k as char);
                }
            }
            let rebuilt = ReadView::new(&s.backend.begin_read().unwrap(), &rebuilt_index).unwrap();
            assert_eq!(rebuilt.key_count().unwrap(), s.view().key_count().unwrap(), "{ctx}");
            assert_eq!(s.view().key_count().unwrap(), states.last().unwrap().len() as u64, "{ctx}");
            for r in 1..=current {
                let whole = RangeRequest { revision: r, ..rr("\0", "\0") };
                if r >= compacted {
                    assert_eq!(
                        rebuilt.range(&whole).unwrap(),
                        s.range(whole.clone()).unwrap(),
                        "{ctx} rev {r} rebuilt"
                    );
                }
                let got = s.range(RangeRequest { revision: r, ..rr("\0", "\0") });
                if r < compacted {
                    assert!(matches!(got, Err(MvccError::Compacted)), "{ctx} rev {r}: {got:?}");
                    continue;
                }
                let want: Vec<KeyValue> = states[r as usize].values().cloned().collect();
                assert_eq!(got.unwrap().kvs, want, "{ctx} rev {r}");
                let one = s.range(RangeRequest { revision: r, limit: 1, ..rr("b", "e") }).unwrap();
                let want: Vec<&KeyValue> =
                    states[r as usize].range(b"b".to_vec()..b"e".to_vec()).map(|(_, kv)| kv).collect();
                assert_eq!(one.count as usize, want.len(), "{ctx} rev {r} count");
                assert_eq!(one.kvs.iter().collect::<Vec<_>>(), want.into_iter().take(1).collect::<Vec<_>>(), "{ctx}");
                for k in b'a'..b'g' {
                    let got = s.range(RangeRequest { revision: r, ..rr(&(k as char).to_string(), "") }).unwrap();
                    assert_eq!(got.kvs.first(), states[r as usize].get(&vec![k]), "{ctx} rev {r} key {}", k as char);
                    assert_eq!(got.count, got.kvs.len() as i64, "{ctx}");
                }
            }
            let view = s.view();
            let from = compacted.max(1) + 1;
            let (events, _) = events::read_events(&view, from, current, 1_000).unwrap();
            for (main, prev, ev) in events {
                let kv = ev.kv.as_ref().unwrap();
                let want = states[main as usize - 1].get(&kv.key);
                assert_eq!(events::prev_kv(&view, prev).unwrap().as_ref(), want, "{ctx} event at {main}");
            }
        }
    }
}

fn put_op_bytes(k: &[u8], v: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.to_vec(),
            value: v.to_vec(),
            ..Default::default()
        })),
    }
}

fn del_op_bytes(k: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key: k.to_vec(),
            ..Default::default()
        })),
    }
}

#[test]
fn a_reader_open_across_a_compaction_keeps_its_snapshot() {
    let s = Store::new();
    s.put("a", "1");
    s.put("a", "2");
    let view = s.view();
    assert_eq!(view.current_rev(), 3);
    s.put("a", "3");
    s.write(|w| w.compact(4)).unwrap();
    // The open view still reads its snapshot: the compaction left its versions.
    assert_eq!(view.range(&rr("a", "")).unwrap().kvs[0].value, b"2");
    drop(view);
    // A transaction opened before a compaction but pinned after it is refused;
    // `open` takes a fresh one. That compaction also prunes what the pin kept.
    let unpinned = s.backend.begin_read().unwrap();
    s.put("b", "1");
    s.write(|w| w.compact(5)).unwrap();
    assert!(matches!(ReadView::new(&unpinned, &s.index), Err(MvccError::Retry)));
    let fresh = ReadView::open(&s.backend, &s.index).unwrap();
    assert_eq!(fresh.compacted_rev(), 5);
    assert_eq!(fresh.range(&rr("a", "")).unwrap().kvs[0].value, b"3");
    assert!(matches!(s.range(RangeRequest { revision: 4, ..rr("a", "") }), Err(MvccError::Compacted)));
}

#[test]
fn lease_records_mark_their_base_and_read_the_older_layout() {
    let s = Store::new();
    let granted = s.write(|w| w.lease_grant(7, 10, 1)).unwrap();
    assert!(!granted.renewed);
    let renewed = s.write(|w| w.lease_renew(7)).unwrap();
    assert!(renewed.renewed && renewed.version == 2);
    s.write(|w| w.lease_checkpoint(7, 2, 4_000)).unwrap();
    let checkpointed = s.view().lease(7).unwrap().unwrap();
    assert_eq!((checkpointed.remaining_ms, checkpointed.version, checkpointed.renewed), (4_000, 3, false));
    // A record written before the flags byte existed (24 bytes) reads as a grant's.
    let old = &renewed.encode()[..24];
    assert_eq!(lease::LeaseRecord::decode(7, old).unwrap(), lease::LeaseRecord { renewed: false, ..renewed });
    let mut bad = renewed.encode();
    bad[24] = 2;
    assert!(matches!(lease::LeaseRecord::decode(7, &bad), Err(MvccError::Corrupt(_))));
    assert!(matches!(lease::LeaseRecord::decode(7, &bad[..20]), Err(MvccError::Corrupt(_))));
}
