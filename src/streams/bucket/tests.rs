use std::collections::BTreeMap;

use super::*;

type Rows = BTreeMap<Vec<u8>, Vec<u8>>;

fn apply(t: &mut Rows, cmd: BlobCommand) -> BlobReply {
    BlobApply { table: t }.apply(cmd).expect("apply")
}

fn id(n: u8) -> ChunkId {
    [n; 32]
}

fn object(chunks: &[u8]) -> ObjectRecord {
    ObjectRecord {
        size: chunks.len() as u64 * 10,
        etag: "\"e\"".into(),
        content_type: String::new(),
        metadata: Vec::new(),
        modified_ms: 0,
        body: Body::Chunks(chunks.iter().map(|n| ChunkRef { id: id(*n), size: 10 }).collect()),
    }
}

fn put(t: &mut Rows, key: &str, chunks: &[u8], now_ms: i64) -> BlobReply {
    let placed = chunks.iter().map(|n| PlacedChunk { id: id(*n), size: 10, replicas: vec![1, 2, 3] }).collect();
    apply(t, BlobCommand::Put { key: key.into(), object: object(chunks), placed, started_ms: now_ms, now_ms })
}

fn refs(t: &Rows, n: u8) -> Option<u64> {
    BlobView { table: t }.chunk(&id(n)).expect("chunk").map(|c| c.refs)
}

fn bucket() -> Rows {
    let mut t = Rows::new();
    let reply = apply(&mut t, BlobCommand::CreateBucket { name: "b".into(), now_ms: 1 });
    assert!(matches!(reply, BlobReply::Bucket(_)));
    t
}

#[test]
fn buckets_are_created_once_and_deleted_only_empty() {
    let mut t = bucket();
    let again = apply(&mut t, BlobCommand::CreateBucket { name: "b".into(), now_ms: 2 });
    assert_eq!(again, BlobReply::Refused(BlobError::BucketExists));
    put(&mut t, "k", &[1], 3);
    assert_eq!(apply(&mut t, BlobCommand::DeleteBucket), BlobReply::Refused(BlobError::BucketNotEmpty));
    assert_eq!(apply(&mut t, BlobCommand::Delete { key: "k".into(), now_ms: 4 }), BlobReply::Deleted(true));
    assert_eq!(apply(&mut t, BlobCommand::Delete { key: "k".into(), now_ms: 4 }), BlobReply::Deleted(false));
    assert_eq!(apply(&mut t, BlobCommand::DeleteBucket), BlobReply::Done);
    assert_eq!(put(&mut t, "k", &[1], 5), BlobReply::Refused(BlobError::NoSuchBucket));
    let mut empty = Rows::new();
    assert_eq!(put(&mut empty, "k", &[1], 5), BlobReply::Refused(BlobError::NoSuchBucket));
}

#[test]
fn references_count_every_occurrence_and_replacement_releases() {
    let mut t = bucket();
    put(&mut t, "a", &[1, 2, 1], 10);
    assert_eq!((refs(&t, 1), refs(&t, 2)), (Some(2), Some(1)));
    put(&mut t, "b", &[2], 11);
    assert_eq!(refs(&t, 2), Some(2));
    // Replacing "a" by an object sharing chunk 2 keeps it referenced.
    put(&mut t, "a", &[2, 3], 12);
    assert_eq!((refs(&t, 1), refs(&t, 2), refs(&t, 3)), (Some(0), Some(2), Some(1)));
    apply(&mut t, BlobCommand::Delete { key: "b".into(), now_ms: 13 });
    assert_eq!(refs(&t, 2), Some(1));
}

#[test]
fn collection_takes_only_chunks_unreferenced_for_the_grace_period() {
    let mut t = bucket();
    put(&mut t, "a", &[1, 2], 0);
    apply(&mut t, BlobCommand::Delete { key: "a".into(), now_ms: 100 });
    put(&mut t, "b", &[2], 200);
    let early = apply(&mut t, BlobCommand::Collect { now_ms: 100 + COLLECT_GRACE_MS - 1, max: 10 });
    assert_eq!(early, BlobReply::Collected(vec![]));
    let due = apply(&mut t, BlobCommand::Collect { now_ms: 100 + COLLECT_GRACE_MS, max: 10 });
    assert_eq!(due, BlobReply::Collected(vec![(id(1), vec![1, 2, 3])]));
    assert_eq!((refs(&t, 1), refs(&t, 2)), (None, Some(1)));
    // A put naming a collected chunk without writing it is refused.
    let reuse = apply(
        &mut t,
        BlobCommand::Put { key: "c".into(), object: object(&[1]), placed: vec![], started_ms: 0, now_ms: 1 },
    );
    assert_eq!(reuse, BlobReply::Refused(BlobError::Unplaced));
}

#[test]
fn a_slow_put_is_refused() {
    let mut t = bucket();
    let placed = vec![PlacedChunk { id: id(1), size: 10, replicas: vec![1] }];
    let slow =
        BlobCommand::Put { key: "k".into(), object: object(&[1]), placed, started_ms: 0, now_ms: MAX_PUT_MS + 1 };
    assert_eq!(apply(&mut t, slow), BlobReply::Refused(BlobError::PutTooSlow));
    assert_eq!(refs(&t, 1), None);
}

/// A model of S3's ListObjectsV2 over a key list, to check the table-driven one.
fn model_list(keys: &[String], prefix: &str, delim: &str, after: &str, max: usize) -> (Vec<String>, Vec<String>, bool) {
    let mut items: Vec<(String, bool)> = Vec::new();
    for k in keys.iter().filter(|k| k.starts_with(prefix) && k.as_str() > after) {
        let item = match delim.is_empty() {
            true => None,
            false => k[prefix.len()..].find(delim).map(|at| k[..prefix.len() + at + delim.len()].to_string()),
        };
        let (name, is_prefix) = match item {
            Some(cp) => (cp, true),
            None => (k.clone(), false),
        };
        let repeated = is_prefix && name == after;
        let seen = items.iter().any(|(n, _)| *n == name);
        if !repeated && !seen {
            items.push((name, is_prefix));
        }
    }
    let truncated = items.len() > max;
    let page: Vec<_> = items.into_iter().take(max).collect();
    let objects = page.iter().filter(|(_, p)| !p).map(|(n, _)| n.clone()).collect();
    let prefixes = page.iter().filter(|(_, p)| *p).map(|(n, _)| n.clone()).collect();
    (objects, prefixes, truncated)
}

#[test]
fn listing_matches_a_model_of_list_objects_v2() {
    let mut t = bucket();
    let mut keys: Vec<String> = Vec::new();
    let parts = ["a", "b", "a/", "b/c", "/", "x"];
    let mut seed = 7u64;
    for _ in 0..400 {
        let mut k = String::new();
        for _ in 0..(seed % 4 + 1) {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            k.push_str(parts[(seed >> 33) as usize % parts.len()]);
        }
        if !keys.contains(&k) {
            keys.push(k.clone());
            put(&mut t, &k, &[1], 1);
        }
    }
    keys.sort();
    let view = BlobView { table: &t };
    for prefix in ["", "a", "a/", "b/c", "zz"] {
        for delim in ["", "/", "c"] {
            for max in [1, 3, 1000] {
                // Page through, checking each page against the model.
                let mut after = String::new();
                let mut pages = 0;
                loop {
                    let got = view.list(prefix, delim, &after, max).expect("list");
                    let (objects, prefixes, truncated) = model_list(&keys, prefix, delim, &after, max);
                    let names: Vec<String> = got.objects.iter().map(|(k, _)| k.clone()).collect();
                    let ctx = format!("prefix {prefix:?} delim {delim:?} max {max} after {after:?}");
                    assert_eq!(names, objects, "{ctx}");
                    assert_eq!(got.common_prefixes, prefixes, "{ctx}");
                    assert_eq!(got.truncated, truncated, "{ctx}");
                    pages += 1;
                    assert!(pages < 1000, "listing does not end: {ctx}");
                    match (got.truncated, got.last) {
                        (true, Some(last)) => after = last,
                        _ => break,
                    }
                }
            }
        }
    }
}

fn part(t: &mut Rows, upload: &str, number: u32, chunk: u8, size: u64) -> BlobReply {
    let part =
        PartRecord { size, md5: [chunk; 16], chunks: vec![ChunkRef { id: id(chunk), size: 10 }], modified_ms: 0 };
    let placed = vec![PlacedChunk { id: id(chunk), size: 10, replicas: vec![1] }];
    apply(t, BlobCommand::PutPart { upload_id: upload.into(), number, part, placed, started_ms: 1, now_ms: 1 })
}

fn etag_of(chunk: u8) -> String {
    PartRecord { size: 0, md5: [chunk; 16], chunks: vec![], modified_ms: 0 }.etag()
}

#[test]
fn multipart_uploads_hold_their_parts_until_completed_or_aborted() {
    let mut t = bucket();
    let upload = UploadRecord { key: "big".into(), content_type: "t".into(), metadata: vec![], created_ms: 1 };
    assert_eq!(part(&mut t, "u1", 1, 1, MIN_PART_BYTES), BlobReply::Refused(BlobError::NoSuchUpload));
    apply(&mut t, BlobCommand::CreateUpload { upload_id: "u1".into(), upload: upload.clone() });
    part(&mut t, "u1", 1, 1, MIN_PART_BYTES);
    part(&mut t, "u1", 2, 2, 7);
    part(&mut t, "u1", 3, 3, 7);
    // Part 3 uploaded again with other bytes: the first one's chunk is released.
    part(&mut t, "u1", 3, 4, 7);
    assert_eq!((refs(&t, 3), refs(&t, 4)), (Some(0), Some(1)));
    assert_eq!(apply(&mut t, BlobCommand::DeleteBucket), BlobReply::Refused(BlobError::BucketNotEmpty));
    let complete = |parts: Vec<(u32, String)>| BlobCommand::CompleteUpload { upload_id: "u1".into(), parts, now_ms: 5 };
    let wrong_tag = apply(&mut t, complete(vec![(1, etag_of(1)), (2, etag_of(9))]));
    assert_eq!(wrong_tag, BlobReply::Refused(BlobError::InvalidPart));
    let order = apply(&mut t, complete(vec![(2, etag_of(2)), (1, etag_of(1))]));
    assert_eq!(order, BlobReply::Refused(BlobError::InvalidPartOrder));
    let small = apply(&mut t, complete(vec![(2, etag_of(2)), (3, etag_of(4))]));
    assert_eq!(small, BlobReply::Refused(BlobError::EntityTooSmall));
    // Parts 1 and 2 make the object; part 3 (not listed) is released.
    let BlobReply::Put(object) = apply(&mut t, complete(vec![(1, etag_of(1)), (2, etag_of(2))])) else {
        panic!("completion refused")
    };
    assert_eq!(object.size, MIN_PART_BYTES + 7);
    assert!(object.etag.ends_with("-2\""), "{}", object.etag);
    assert_eq!(object.chunks().len(), 2);
    assert_eq!((refs(&t, 1), refs(&t, 2), refs(&t, 4)), (Some(1), Some(1), Some(0)));
    assert_eq!(BlobView { table: &t }.upload("u1").expect("upload"), None);
    // Abort releases every part.
    apply(&mut t, BlobCommand::CreateUpload { upload_id: "u2".into(), upload });
    part(&mut t, "u2", 1, 5, 7);
    assert_eq!(refs(&t, 5), Some(1));
    assert_eq!(apply(&mut t, BlobCommand::AbortUpload { upload_id: "u2".into(), now_ms: 6 }), BlobReply::Done);
    assert_eq!(refs(&t, 5), Some(0));
    let again = apply(&mut t, BlobCommand::AbortUpload { upload_id: "u2".into(), now_ms: 6 });
    assert_eq!(again, BlobReply::Refused(BlobError::NoSuchUpload));
}

/// A small seeded generator for the property test (no clock, no OS randomness).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// No chunk a committed object references ever loses its file, with puts,
/// deletes, the collector and the orphan sweeper interleaved at random and
/// time moving in jumps of up to four minutes. Files follow the chunk store's
/// rules: a put writes its chunks (or renews their time) before it commits; the
/// collector drops records unreferenced for the grace period and then removes
/// their files if stale; the sweeper removes stale files no record names.
#[test]
fn a_referenced_chunk_never_loses_its_file() {
    for seed in 0..200u64 {
        let mut rng = Lcg(seed);
        let mut t = bucket();
        let mut files: BTreeMap<u8, i64> = BTreeMap::new();
        let mut pending: Vec<(String, Vec<u8>, i64)> = Vec::new();
        let mut now: i64 = 10;
        let stale =
            |files: &BTreeMap<u8, i64>, c: u8, now: i64| files.get(&c).is_some_and(|m| now - m >= COLLECT_GRACE_MS);
        for step in 0..400 {
            match rng.below(7) {
                0 | 1 => {
                    let chunks: Vec<u8> = (0..1 + rng.below(3)).map(|_| rng.below(200) as u8).collect();
                    for c in &chunks {
                        files.insert(*c, now);
                    }
                    pending.push((format!("k{}", rng.below(4)), chunks, now));
                }
                2 if !pending.is_empty() => {
                    let (key, chunks, started_ms) = pending.remove(rng.below(pending.len() as u64) as usize);
                    let placed =
                        chunks.iter().map(|c| PlacedChunk { id: id(*c), size: 10, replicas: vec![1] }).collect();
                    apply(&mut t, BlobCommand::Put { key, object: object(&chunks), placed, started_ms, now_ms: now });
                }
                3 => {
                    let key = format!("k{}", rng.below(4));
                    apply(&mut t, BlobCommand::Delete { key, now_ms: now });
                }
                4 => {
                    if let BlobReply::Collected(gone) = apply(&mut t, BlobCommand::Collect { now_ms: now, max: 100 }) {
                        for (cid, _) in gone {
                            if stale(&files, cid[0], now) {
                                files.remove(&cid[0]);
                            }
                        }
                    }
                }
                5 => {
                    let view = BlobView { table: &t };
                    let orphans: Vec<u8> = files
                        .keys()
                        .copied()
                        .filter(|c| view.chunk(&id(*c)).expect("chunk").is_none() && stale(&files, *c, now))
                        .collect();
                    for c in orphans {
                        files.remove(&c);
                    }
                }
                _ => now += rng.below(4 * 60 * 1000) as i64,
            }
            let view = BlobView { table: &t };
            for (key, o) in view.objects(None, 100).expect("objects") {
                for c in o.chunks() {
                    assert!(
                        files.contains_key(&c.id[0]),
                        "seed {seed} step {step}: {key} names chunk {} with no file",
                        c.id[0]
                    );
                    let rec = view.chunk(&c.id).expect("chunk").expect("a referenced chunk has a record");
                    assert!(rec.refs >= 1, "seed {seed} step {step}: a referenced chunk at zero references");
                }
            }
        }
    }
}
