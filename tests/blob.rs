//! The blob store (`concord.blob.v1`) on a 4-member cluster of real processes,
//! 3 replicas per chunk and 1 MiB chunks:
//! - 1,000 random objects from 0 B to 20 MiB (most small, as stores hold them),
//!   put through every member and read back through another, bit-exact; every
//!   chunk file on exactly 3 distinct members (the ring's choice), and objects
//!   up to 4 KiB inline with no chunk at all.
//! - A flipped byte in a chunk file: the object still reads back correct, the
//!   member's corruption counter rises, and the replica is rewritten good.
//! - Ranges, listing with a delimiter, copy within and across buckets, delete,
//!   a bucket that holds objects refusing deletion, and fsck finding a lost
//!   replica.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use concord::proto::blob as pb;
use concord::proto::blob::blob_client::BlobClient;
use concord_testkit::workload::SeededRng;
use concord_testkit::{ClusterOptions, ProcessCluster};
use futures::StreamExt;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_concord");
const CHUNK: usize = 1 << 20;

async fn client(endpoint: &str) -> BlobClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match BlobClient::connect(endpoint.to_string()).await {
            Ok(c) => return c.max_decoding_message_size(64 << 20),
            Err(e) if Instant::now() > deadline => panic!("connect {endpoint}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn bytes(rng: &mut SeededRng, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(n);
    out
}

async fn put(
    c: &mut BlobClient<Channel>,
    bucket: &str,
    key: &str,
    data: &[u8],
) -> Result<pb::ObjectInfo, tonic::Status> {
    let header = pb::PutRequest {
        part: Some(pb::put_request::Part::Header(pb::PutHeader {
            bucket: bucket.into(),
            key: key.into(),
            content_type: "application/octet-stream".into(),
            ..Default::default()
        })),
    };
    // Pieces of uneven size, so chunk boundaries fall inside messages.
    let mut messages = vec![header];
    for piece in data.chunks(300_007) {
        messages.push(pb::PutRequest { part: Some(pb::put_request::Part::Data(piece.to_vec())) });
    }
    Ok(c.put(futures::stream::iter(messages)).await?.into_inner().object.expect("object info"))
}

async fn get(
    c: &mut BlobClient<Channel>,
    bucket: &str,
    key: &str,
    offset: u64,
    length: Option<u64>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream =
        c.get(pb::GetRequest { bucket: bucket.into(), key: key.into(), offset, length }).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// Retries while the cluster answers UNAVAILABLE (a bucket's group electing).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("{what}: {s:?}"),
        }
    }
}

/// Every chunk file under a member's data dir: (bucket group dir, hash) → path.
fn chunk_files(data_dir: &Path) -> BTreeMap<(String, String), PathBuf> {
    let mut out = BTreeMap::new();
    let root = data_dir.join("member").join("blobs");
    let Ok(buckets) = std::fs::read_dir(&root) else { return out };
    for b in buckets.flatten() {
        for fan in std::fs::read_dir(b.path()).expect("fan dirs").flatten() {
            for f in std::fs::read_dir(fan.path()).expect("chunk files").flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                out.insert((b.file_name().to_string_lossy().into_owned(), name), f.path());
            }
        }
    }
    out
}

fn metric(port: u16, name: &str) -> u64 {
    let (_, body) = concord_testkit::http_get(port, "/metrics").expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_round_trip_with_chunks_on_three_members_and_corruption_repaired() {
    // No scrubbing: the corrupt chunk below is to be found by a read.
    let options = ClusterOptions {
        extra_args: vec!["--blob-chunk-bytes".into(), CHUNK.to_string(), "--blob-scrub-bytes-per-s".into(), "0".into()],
        ..ClusterOptions::default()
    };
    let cluster = ProcessCluster::start(Path::new(BIN), 4, options);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints();
    let mut clients = Vec::new();
    for e in &endpoints {
        clients.push(client(e).await);
    }
    retry("create bucket", || {
        let mut c = clients[0].clone();
        async move { c.create_bucket(pb::CreateBucketRequest { bucket: "data".into() }).await }
    })
    .await;
    let again = clients[1].create_bucket(pb::CreateBucketRequest { bucket: "data".into() }).await;
    assert_eq!(again.expect_err("bucket created twice").code(), tonic::Code::AlreadyExists);
    let bad = clients[1].create_bucket(pb::CreateBucketRequest { bucket: "No_Such".into() }).await;
    assert_eq!(bad.expect_err("bad bucket name").code(), tonic::Code::InvalidArgument);

    // 1,000 objects: sizes log-uniform from 0 B to 20 MiB, most of them small.
    let mut rng = SeededRng::new(concord_testkit::workload::seed_from_env());
    let mut work = Vec::new();
    for i in 0..1000usize {
        let size = match i {
            0 => 0,
            1 => 20 << 20,
            2 => CHUNK,
            3 => 4096,
            4 => 4097,
            _ => {
                let bits = rng.below(25);
                (rng.next_u64() % (1u64 << bits)) as usize
            }
        };
        work.push((i, format!("dir{}/obj-{i:04}", i % 7), rng.next_u64(), size));
    }
    // Eight puts at a time, each through the next member; the data is made
    // from a per-object seed, so it need not be kept.
    let started = Instant::now();
    let puts = futures::stream::iter(work.clone()).map(|(i, key, seed, size)| {
        let c = clients[i % 4].clone();
        async move {
            let data = bytes(&mut SeededRng::new(seed), size);
            let info = retry("put", || {
                let (mut c, key, data) = (c.clone(), key.clone(), &data);
                async move { put(&mut c, "data", &key, data).await }
            })
            .await;
            assert_eq!(info.size as usize, size);
            assert_eq!(info.chunks as usize, if size <= 4096 { 0 } else { size.div_ceil(CHUNK) }, "{key}");
            assert_eq!(info.etag, format!("\"{}\"", md5_hex(&data)), "{key}");
            let chunks: Vec<String> = match size <= 4096 {
                true => Vec::new(),
                false => data.chunks(CHUNK).map(|c| blake3::hash(c).to_hex().to_string()).collect(),
            };
            (key, blake3::hash(&data), size, chunks)
        }
    });
    let objects: Vec<(String, blake3::Hash, usize, Vec<String>)> = puts.buffered(8).collect().await;
    eprintln!("1,000 puts: {:?}", started.elapsed());
    let started = Instant::now();
    let gets = futures::stream::iter(objects.iter().enumerate()).map(|(i, (key, hash, size, _))| {
        let mut c = clients[(i + 1) % 4].clone();
        async move {
            let back = get(&mut c, "data", key, 0, None).await.expect("get");
            assert_eq!(back.len(), *size, "{key}");
            assert_eq!(blake3::hash(&back), *hash, "{key} read back differs");
        }
    });
    gets.buffer_unordered(8).collect::<Vec<()>>().await;
    eprintln!("1,000 gets: {:?}", started.elapsed());

    // Every chunk on exactly three distinct members.
    let mut holders: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, m) in cluster.members.iter().enumerate() {
        for (id, _) in chunk_files(&m.data_dir) {
            holders.entry(id).or_default().push(i);
        }
    }
    assert!(holders.len() > 100, "only {} chunks stored", holders.len());
    for (id, members) in &holders {
        assert_eq!(members.len(), 3, "chunk {id:?} is on members {members:?}");
    }
    for i in 0..4 {
        let on = holders.values().filter(|m| m.contains(&i)).count();
        assert!(on > 0, "member {i} holds no chunk");
    }

    // Ranges inside one chunk, across chunks, and past the end.
    let (key, _, _, _) = &objects[1];
    let whole = get(&mut clients[0], "data", key, 0, None).await.expect("get");
    let part = get(&mut clients[2], "data", key, CHUNK as u64 - 10, Some(CHUNK as u64 + 20)).await.expect("range");
    assert_eq!(part, whole[CHUNK - 10..2 * CHUNK + 10]);
    let past = get(&mut clients[2], "data", key, whole.len() as u64 + 1, None).await;
    assert_eq!(past.expect_err("range past the end").code(), tonic::Code::OutOfRange);

    // One flipped byte in a chunk on member `m`: read through `m` (which tries
    // its own copy first), still correct, counted, repaired.
    let (m, path) = cluster
        .members
        .iter()
        .enumerate()
        .find_map(|(i, member)| {
            let files = chunk_files(&member.data_dir);
            files
                .values()
                .find(|p| std::fs::metadata(p).map(|md| md.len() == CHUNK as u64).unwrap_or(false))
                .map(|p| (i, p.clone()))
        })
        .expect("a full chunk somewhere");
    let good = std::fs::read(&path).expect("chunk");
    let mut flipped = good.clone();
    flipped[12345] ^= 0x40;
    std::fs::write(&path, &flipped).expect("flip");
    let hash_hex = path.file_name().expect("name").to_string_lossy().into_owned();
    let before = metric(cluster.members[m].client_port, "concord_blob_chunks_corrupt_total");
    // Read an object holding that chunk through `m`.
    let (key, hash, _, _) = objects.iter().find(|o| o.3.contains(&hash_hex)).expect("an object with the chunk");
    let back = get(&mut clients[m], "data", key, 0, None).await.expect("get after corruption");
    assert_eq!(blake3::hash(&back), *hash, "{key} read back wrong after a chunk was corrupted");
    let after = metric(cluster.members[m].client_port, "concord_blob_chunks_corrupt_total");
    assert_eq!(after, before + 1, "the corrupt chunk {hash_hex} was not counted");
    let repaired = concord_testkit::eventually(Duration::from_secs(10), || {
        let path = path.clone();
        let good = good.clone();
        async move { (std::fs::read(&path).ok()? == good).then_some(()) }
    })
    .await;
    assert!(repaired.is_some(), "the corrupt replica was not rewritten");
    let total_repaired: u64 =
        cluster.members.iter().map(|mm| metric(mm.client_port, "concord_blob_chunks_repaired_total")).sum();
    assert!(total_repaired >= 1);

    // Listing with a delimiter, then paging without one.
    let listed = clients[3]
        .list(pb::ListRequest { bucket: "data".into(), delimiter: "/".into(), ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.common_prefixes, (0..7).map(|d| format!("dir{d}/")).collect::<Vec<_>>());
    assert!(listed.objects.is_empty());
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = clients[2]
            .list(pb::ListRequest {
                bucket: "data".into(),
                prefix: "dir3/".into(),
                start_after: after.clone(),
                max_keys: 50,
                ..Default::default()
            })
            .await
            .expect("list page")
            .into_inner();
        seen.extend(page.objects.iter().map(|o| o.key.clone()));
        if !page.truncated {
            break;
        }
        after = page.next_start_after;
    }
    let mut want: Vec<String> =
        objects.iter().map(|(k, _, _, _)| k.clone()).filter(|k| k.starts_with("dir3/")).collect();
    want.sort();
    assert_eq!(seen, want);

    // Copy within the bucket (shares chunks) and to another bucket (copies them).
    retry("create bucket", || {
        let mut c = clients[1].clone();
        async move { c.create_bucket(pb::CreateBucketRequest { bucket: "other".into() }).await }
    })
    .await;
    let (key, hash, _, _) = objects[1].clone();
    for (bucket, to) in [("data", "copy-here"), ("other", "copy-there")] {
        let req =
            pb::CopyRequest { src_bucket: "data".into(), src_key: key.clone(), bucket: bucket.into(), key: to.into() };
        retry("copy", || {
            let (mut c, req) = (clients[2].clone(), req.clone());
            async move { c.copy(req).await }
        })
        .await;
        let back = get(&mut clients[3], bucket, to, 0, None).await.expect("get copy");
        assert_eq!(blake3::hash(&back), hash);
    }
    let buckets = clients[0].list_buckets(pb::ListBucketsRequest {}).await.expect("buckets").into_inner();
    let names: Vec<String> = buckets.buckets.iter().map(|b| b.name.clone()).collect();
    assert_eq!(names, ["data", "other"]);

    // fsck: clean, then a replica lost.
    let clean = clients[0].fsck(pb::FsckRequest { bucket: "other".into() }).await.expect("fsck").into_inner();
    assert_eq!((clean.objects, clean.problems.len()), (1, 0), "{clean:?}");
    let data_group = path.parent().and_then(|fan| fan.parent()).and_then(|b| b.file_name()).expect("bucket dir");
    let data_group = data_group.to_string_lossy().into_owned();
    let other_files: Vec<PathBuf> = cluster
        .members
        .iter()
        .flat_map(|mm| chunk_files(&mm.data_dir))
        .filter(|((bucket, _), _)| *bucket != data_group)
        .map(|(_, p)| p)
        .collect();
    assert_eq!(other_files.len(), 3 * (20 << 20) / CHUNK, "the copied object's chunks");
    std::fs::remove_file(&other_files[0]).expect("remove a replica");
    let report = clients[1].fsck(pb::FsckRequest { bucket: "other".into() }).await.expect("fsck").into_inner();
    assert!(report.problems.iter().any(|p| p.problem == "missing"), "{report:?}");
    assert!(report.problems.iter().any(|p| p.problem == "under-replicated"), "{report:?}");

    // Deletes: an object, then a bucket only once empty.
    let refused = clients[2].delete_bucket(pb::DeleteBucketRequest { bucket: "other".into() }).await;
    assert_eq!(refused.expect_err("a non-empty bucket deleted").code(), tonic::Code::FailedPrecondition);
    clients[2].delete(pb::DeleteRequest { bucket: "other".into(), key: "copy-there".into() }).await.expect("delete");
    let gone = clients[0].head(pb::HeadRequest { bucket: "other".into(), key: "copy-there".into() }).await;
    assert_eq!(gone.expect_err("a deleted object").code(), tonic::Code::NotFound);
    clients[2].delete_bucket(pb::DeleteBucketRequest { bucket: "other".into() }).await.expect("delete bucket");
    let buckets = clients[3].list_buckets(pb::ListBucketsRequest {}).await.expect("buckets").into_inner();
    assert_eq!(buckets.buckets.len(), 1);
    let missing = clients[3].head(pb::HeadRequest { bucket: "other".into(), key: "x".into() }).await;
    assert_eq!(missing.expect_err("a deleted bucket").code(), tonic::Code::NotFound);
}

fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A put while a member is paused reaches two replicas; the third is copied
/// once the member is back. A corrupt chunk no client reads is found and
/// rewritten by the scrubber.
/// Kill one of four members for good: every chunk is back on three live
/// members within the repair delay and a few repair rounds, fsck finds nothing
/// wrong, and every object reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrubbed_corruption_is_rewritten_and_a_lost_members_chunks_are_copied_back() {
    let options = ClusterOptions {
        extra_args: vec![
            "--blob-chunk-bytes".into(),
            CHUNK.to_string(),
            "--blob-repair-delay-ms".into(),
            "3000".into(),
            "--blob-scrub-bytes-per-s".into(),
            (1u64 << 30).to_string(),
        ],
        ..ClusterOptions::default()
    };
    let mut cluster = ProcessCluster::start(Path::new(BIN), 4, options);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c = client(&cluster.endpoints()[0]).await;
    retry("create bucket", || {
        let mut c = c.clone();
        async move { c.create_bucket(pb::CreateBucketRequest { bucket: "keep".into() }).await }
    })
    .await;
    let mut rng = SeededRng::new(concord_testkit::workload::seed_from_env());
    let mut objects = Vec::new();
    for i in 0..20 {
        let data = bytes(&mut rng, CHUNK * 5 / 2);
        let key = format!("o{i}");
        retry("put", || {
            let (mut c, key, data) = (c.clone(), key.clone(), &data);
            async move { put(&mut c, "keep", &key, data).await }
        })
        .await;
        objects.push((key, blake3::hash(&data)));
    }
    // A put while member 2 is paused reaches a quorum of replicas only; once
    // member 2 is back, the repairer copies the chunks it missed to it.
    cluster.pause(2);
    let data = bytes(&mut rng, CHUNK * 3);
    retry("put while a member is paused", || {
        let (mut c, data) = (c.clone(), &data);
        async move { put(&mut c, "keep", "during-pause", data).await }
    })
    .await;
    objects.push(("during-pause".to_string(), blake3::hash(&data)));
    cluster.resume(2);
    let caught_up = concord_testkit::eventually(Duration::from_secs(60), || {
        let mut c = c.clone();
        async move {
            let report = c.fsck(pb::FsckRequest { bucket: "keep".into() }).await.ok()?.into_inner();
            report.problems.is_empty().then_some(())
        }
    })
    .await;
    assert!(caught_up.is_some(), "the chunks written while a member was paused were not copied to it");

    // A flipped byte in a chunk on member 1, never read by a client: the
    // scrubber finds it and rewrites it from another replica.
    let (_, path) = chunk_files(&cluster.members[1].data_dir).into_iter().next().expect("a chunk on member 1");
    let good = std::fs::read(&path).expect("chunk");
    let mut flipped = good.clone();
    flipped[777] ^= 1;
    std::fs::write(&path, &flipped).expect("flip");
    let healed = concord_testkit::eventually(Duration::from_secs(60), || {
        let (path, good) = (path.clone(), good.clone());
        async move { (std::fs::read(&path).ok()? == good).then_some(()) }
    })
    .await;
    assert!(healed.is_some(), "the scrubber did not rewrite the corrupt chunk");
    assert!(metric(cluster.members[1].client_port, "concord_blob_chunks_corrupt_total") >= 1);

    // The member to lose: one holding chunks, and not the one we ask.
    let lost = 3;
    let before = chunk_files(&cluster.members[lost].data_dir).len();
    assert!(before > 0, "member {lost} holds no chunk");
    let copied_before: u64 = (0..4)
        .filter(|m| *m != lost)
        .map(|m| metric(cluster.members[m].client_port, "concord_blob_chunks_rereplicated_total"))
        .sum();
    cluster.kill(lost);
    let healthy = concord_testkit::eventually(Duration::from_secs(90), || {
        let mut c = c.clone();
        async move {
            let report = c.fsck(pb::FsckRequest { bucket: "keep".into() }).await.ok()?.into_inner();
            report.problems.is_empty().then_some(report)
        }
    })
    .await;
    let report = healthy.expect("chunks were not copied back to three replicas");
    assert_eq!(report.objects, 21);
    let mut holders: BTreeMap<(String, String), usize> = BTreeMap::new();
    for m in (0..4).filter(|m| *m != lost) {
        for (id, _) in chunk_files(&cluster.members[m].data_dir) {
            *holders.entry(id).or_default() += 1;
        }
    }
    assert_eq!(holders.len() as u64, report.chunks);
    for (id, n) in &holders {
        assert_eq!(*n, 3, "chunk {id:?} on {n} live members");
    }
    let copied: u64 = (0..4)
        .filter(|m| *m != lost)
        .map(|m| metric(cluster.members[m].client_port, "concord_blob_chunks_rereplicated_total"))
        .sum();
    assert_eq!((copied - copied_before) as usize, before, "copies made for the lost member's chunks");
    for (key, hash) in &objects {
        let back = get(&mut c, "keep", key, 0, None).await.expect("get");
        assert_eq!(blake3::hash(&back), *hash, "{key}");
    }
}
