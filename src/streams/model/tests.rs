//! The model against Redis 7's documented behaviour, on an in-memory table.

use std::collections::BTreeMap;

use super::*;

fn id(ms: u64, seq: u64) -> StreamId {
    StreamId::new(ms, seq)
}

fn f(pairs: &[(&str, &str)]) -> Fields {
    pairs.iter().map(|(a, b)| (a.as_bytes().to_vec(), b.as_bytes().to_vec())).collect()
}

struct Fixture(BTreeMap<Vec<u8>, Vec<u8>>);

impl Fixture {
    fn new() -> Fixture {
        Fixture(BTreeMap::new())
    }
    fn apply(&mut self, cmd: StreamCommand) -> Value {
        Streams { table: &mut self.0 }.apply(cmd).expect("apply")
    }
    fn view(&self) -> View<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        View { table: &self.0 }
    }
    fn add(&mut self, key: &str, spec: IdSpec, now_ms: u64) -> Value {
        self.apply(StreamCommand::Add {
            key: key.into(),
            id: spec,
            fields: f(&[("f", "v")]),
            no_mkstream: false,
            trim: None,
            now_ms,
        })
    }
    fn read_group(&mut self, consumer: &str, from: GroupRead, count: Option<u64>, now_ms: u64) -> Value {
        self.apply(StreamCommand::ReadGroup {
            key: b"s".to_vec(),
            group: b"g".to_vec(),
            consumer: consumer.into(),
            from,
            count,
            no_ack: false,
            now_ms,
        })
    }
}

fn bulk(s: &str) -> Value {
    Value::Bulk(s.as_bytes().to_vec())
}

fn ids_of(v: &Value) -> Vec<String> {
    let Value::Array(items) = v else { panic!("not an array: {v:?}") };
    items
        .iter()
        .map(|e| match e {
            Value::Array(pair) => match &pair[0] {
                Value::Bulk(b) => String::from_utf8(b.clone()).expect("utf8"),
                other => panic!("id {other:?}"),
            },
            Value::Bulk(b) => String::from_utf8(b.clone()).expect("utf8"),
            other => panic!("entry {other:?}"),
        })
        .collect()
}

#[test]
fn ids_are_generated_and_checked_as_redis_does() {
    let mut x = Fixture::new();
    assert_eq!(x.add("s", IdSpec::Explicit(id(0, 0)), 5), Value::err(ERR_ZERO_ID));
    assert_eq!(x.add("s", IdSpec::Explicit(id(5, 1)), 5), bulk("5-1"));
    assert_eq!(x.add("s", IdSpec::Explicit(id(5, 1)), 5), Value::err(ERR_SMALLER_ID));
    assert_eq!(x.add("s", IdSpec::AutoSeq(5), 5), bulk("5-2"));
    assert_eq!(x.add("s", IdSpec::AutoSeq(4), 5), Value::err(ERR_SMALLER_ID));
    assert_eq!(x.add("s", IdSpec::AutoSeq(9), 5), bulk("9-0"));
    // The clock behind the last id: the last id's next sequence.
    assert_eq!(x.add("s", IdSpec::Auto, 3), bulk("9-1"));
    assert_eq!(x.add("s", IdSpec::Auto, 100), bulk("100-0"));
    assert_eq!(x.view().len(b"s").expect("len"), Value::Integer(5));
    assert_eq!(x.view().len(b"missing").expect("len"), Value::Integer(0));
    let nomk = StreamCommand::Add {
        key: b"missing".to_vec(),
        id: IdSpec::Auto,
        fields: f(&[("a", "b")]),
        no_mkstream: true,
        trim: None,
        now_ms: 1,
    };
    assert_eq!(x.apply(nomk), Value::Nil);
    assert!(x.view().meta(b"missing").expect("meta").is_none());
}

#[test]
fn ranges_counts_and_reverse() {
    let mut x = Fixture::new();
    for i in 1..=5 {
        x.add("s", IdSpec::Explicit(id(i, 0)), 0);
    }
    let v = x.view();
    assert_eq!(
        ids_of(&v.range(b"s", StreamId::MIN, StreamId::MAX, None, false).expect("r")),
        ["1-0", "2-0", "3-0", "4-0", "5-0"]
    );
    assert_eq!(ids_of(&v.range(b"s", id(2, 0), id(4, u64::MAX), Some(2), false).expect("r")), ["2-0", "3-0"]);
    assert_eq!(ids_of(&v.range(b"s", id(2, 0), id(4, u64::MAX), Some(2), true).expect("r")), ["4-0", "3-0"]);
    assert_eq!(v.range(b"s", StreamId::MIN, StreamId::MAX, Some(0), false).expect("r"), Value::NilArray);
    assert_eq!(v.range(b"s", id(4, 0), id(2, 0), None, false).expect("r"), Value::Array(vec![]));
    assert_eq!(v.read_after(b"s", id(5, 0), None).expect("r"), None);
    assert_eq!(ids_of(&v.read_after(b"s", id(3, 0), None).expect("r").expect("some")), ["4-0", "5-0"]);
}

#[test]
fn trimming_exact_and_by_whole_nodes() {
    let mut x = Fixture::new();
    for i in 1..=250 {
        x.add("s", IdSpec::Explicit(id(i, 0)), 0);
    }
    let approx = |max| Trim { strategy: TrimStrategy::MaxLen(max), approx: true, limit: Some(DEFAULT_APPROX_LIMIT) };
    // 10 over the limit: no whole node to drop.
    assert_eq!(x.apply(StreamCommand::Trim { key: b"s".to_vec(), trim: approx(240) }), Value::Integer(0));
    assert_eq!(x.apply(StreamCommand::Trim { key: b"s".to_vec(), trim: approx(120) }), Value::Integer(100));
    let exact = Trim { strategy: TrimStrategy::MaxLen(100), approx: false, limit: None };
    assert_eq!(x.apply(StreamCommand::Trim { key: b"s".to_vec(), trim: exact }), Value::Integer(50));
    assert_eq!(x.view().len(b"s").expect("len"), Value::Integer(100));
    let minid = Trim { strategy: TrimStrategy::MinId(id(200, 0)), approx: false, limit: None };
    assert_eq!(x.apply(StreamCommand::Trim { key: b"s".to_vec(), trim: minid }), Value::Integer(49));
    assert_eq!(x.view().meta(b"s").expect("meta").expect("stream").first_id, id(200, 0));
    // `~ 0` takes the last, partial node too.
    let all = Trim { strategy: TrimStrategy::MaxLen(0), approx: true, limit: Some(DEFAULT_APPROX_LIMIT) };
    assert_eq!(x.apply(StreamCommand::Trim { key: b"s".to_vec(), trim: all }), Value::Integer(51));
}

#[test]
fn consumer_groups_deliver_once_and_track_pending() {
    let mut x = Fixture::new();
    for i in 1..=4 {
        x.add("s", IdSpec::Explicit(id(i, 0)), 0);
    }
    let create = |start| StreamCommand::GroupCreate {
        key: b"s".to_vec(),
        group: b"g".to_vec(),
        start,
        mkstream: false,
        entries_read: None,
    };
    assert_eq!(x.apply(create(GroupStart::At(StreamId::MIN))), Value::Ok);
    assert_eq!(x.apply(create(GroupStart::Last)), Value::err(ERR_BUSYGROUP));
    assert_eq!(ids_of(&x.read_group("alice", GroupRead::New, Some(3), 1000)), ["1-0", "2-0", "3-0"]);
    assert_eq!(ids_of(&x.read_group("bob", GroupRead::New, None, 1000)), ["4-0"]);
    assert_eq!(x.read_group("bob", GroupRead::New, None, 1000), Value::NilArray);
    // History: alice's pending entries, without redelivering anything new.
    assert_eq!(ids_of(&x.read_group("alice", GroupRead::History(StreamId::MIN), None, 1500)), ["1-0", "2-0", "3-0"]);
    let ack = StreamCommand::Ack { key: b"s".to_vec(), group: b"g".to_vec(), ids: vec![id(1, 0), id(9, 9)] };
    assert_eq!(x.apply(ack), Value::Integer(1));
    let summary = x.view().pending_summary(b"s", b"g").expect("xpending");
    assert_eq!(
        summary,
        Value::Array(vec![
            Value::Integer(3),
            bulk("2-0"),
            bulk("4-0"),
            Value::Array(vec![
                Value::Array(vec![bulk("alice"), bulk("2")]),
                Value::Array(vec![bulk("bob"), bulk("1")])
            ]),
        ])
    );
    // Claims: only entries idle long enough move, and their delivery count grows.
    let claim = |min_idle_ms, now_ms| StreamCommand::Claim {
        key: b"s".to_vec(),
        group: b"g".to_vec(),
        consumer: b"carol".to_vec(),
        min_idle_ms,
        ids: vec![id(2, 0), id(4, 0)],
        options: ClaimOptions::default(),
        now_ms,
    };
    assert_eq!(ids_of(&x.apply(claim(5000, 2000))), Vec::<String>::new());
    assert_eq!(ids_of(&x.apply(claim(500, 2000))), ["2-0", "4-0"]);
    let detail =
        x.view().pending_range(b"s", b"g", None, StreamId::MIN, StreamId::MAX, 10, Some(b"carol"), 2600).expect("x");
    assert_eq!(
        detail,
        Value::Array(vec![
            // Delivered, read again as history, claimed: three deliveries.
            Value::Array(vec![bulk("2-0"), bulk("carol"), Value::Integer(600), Value::Integer(3)]),
            Value::Array(vec![bulk("4-0"), bulk("carol"), Value::Integer(600), Value::Integer(2)]),
        ])
    );
    // A deleted pending entry leaves the list when claimed, and XAUTOCLAIM reports it.
    x.apply(StreamCommand::DelEntries { key: b"s".to_vec(), ids: vec![id(3, 0)] });
    let auto = StreamCommand::AutoClaim {
        key: b"s".to_vec(),
        group: b"g".to_vec(),
        consumer: b"dave".to_vec(),
        min_idle_ms: 0,
        start: StreamId::MIN,
        count: 10,
        just_id: true,
        now_ms: 3000,
    };
    assert_eq!(
        x.apply(auto),
        Value::Array(vec![bulk("0-0"), Value::Array(vec![bulk("2-0"), bulk("4-0")]), Value::Array(vec![bulk("3-0")])])
    );
    let del = StreamCommand::DelConsumer { key: b"s".to_vec(), group: b"g".to_vec(), consumer: b"dave".to_vec() };
    assert_eq!(x.apply(del), Value::Integer(2));
    let destroy = StreamCommand::GroupDestroy { key: b"s".to_vec(), group: b"g".to_vec() };
    assert_eq!(x.apply(destroy.clone()), Value::Integer(1));
    assert_eq!(x.apply(destroy), Value::Integer(0));
    assert!(x.0.keys().all(|k| k[0] == b'M' || k[0] == b'E'), "a destroyed group left rows");
}

#[test]
fn lag_follows_reads_and_deletes() {
    let mut x = Fixture::new();
    for i in 1..=5 {
        x.add("s", IdSpec::Explicit(id(i, 0)), 0);
    }
    x.apply(StreamCommand::GroupCreate {
        key: b"s".to_vec(),
        group: b"g".to_vec(),
        start: GroupStart::At(StreamId::MIN),
        mkstream: false,
        entries_read: None,
    });
    let lag = |x: &Fixture| {
        let Value::Array(groups) = x.view().info_groups(b"s").expect("info") else { panic!() };
        let Value::Map(fields) = &groups[0] else { panic!() };
        (fields[4].1.clone(), fields[5].1.clone())
    };
    assert_eq!(lag(&x), (Value::Nil, Value::Integer(5)));
    x.read_group("a", GroupRead::New, Some(2), 0);
    assert_eq!(lag(&x), (Value::Integer(2), Value::Integer(3)));
    // A tombstone ahead of the group makes the lag unknowable.
    x.apply(StreamCommand::DelEntries { key: b"s".to_vec(), ids: vec![id(4, 0)] });
    assert_eq!(lag(&x).1, Value::Nil);
    x.read_group("a", GroupRead::New, None, 0);
    assert_eq!(lag(&x), (Value::Integer(5), Value::Integer(0)));
}

#[test]
fn deleting_a_key_removes_every_row() {
    let mut x = Fixture::new();
    x.add("s", IdSpec::Explicit(id(1, 0)), 0);
    x.add("s2", IdSpec::Explicit(id(1, 0)), 0);
    x.apply(StreamCommand::GroupCreate {
        key: b"s".to_vec(),
        group: b"g".to_vec(),
        start: GroupStart::Last,
        mkstream: false,
        entries_read: None,
    });
    assert_eq!(x.apply(StreamCommand::DelKey { key: b"s".to_vec() }), Value::Integer(1));
    assert_eq!(x.apply(StreamCommand::DelKey { key: b"s".to_vec() }), Value::Integer(0));
    assert_eq!(x.view().len(b"s2").expect("len"), Value::Integer(1));
    assert_eq!(x.0.len(), 2, "only s2's rows remain");
}

#[test]
fn xclaim_force_creates_pending_entries_whatever_the_min_idle() {
    let mut x = Fixture::new();
    x.add("s", IdSpec::Explicit(id(1, 0)), 0);
    x.apply(StreamCommand::GroupCreate {
        key: b"s".to_vec(),
        group: b"g".to_vec(),
        start: GroupStart::Last,
        mkstream: false,
        entries_read: None,
    });
    let claim = |force| StreamCommand::Claim {
        key: b"s".to_vec(),
        group: b"g".to_vec(),
        consumer: b"c".to_vec(),
        min_idle_ms: 60_000,
        ids: vec![id(1, 0)],
        options: ClaimOptions { force, just_id: true, ..ClaimOptions::default() },
        now_ms: 1_000,
    };
    assert_eq!(ids_of(&x.apply(claim(false))), Vec::<String>::new(), "not pending, no FORCE: nothing");
    assert_eq!(ids_of(&x.apply(claim(true))), ["1-0"], "FORCE makes it pending for c");
    assert_eq!(ids_of(&x.apply(claim(true))), Vec::<String>::new(), "now pending and not idle long enough");
}
