//! `concord blob ...`: the blob store (`concord.blob.v1`, buckets of objects in
//! S3's model) from the command line — make and remove buckets, list, upload,
//! download, inspect, copy and delete objects, check every stored chunk, and
//! create, list and delete the access keys of the S3 gateway (`keys`).
//!
//! Objects are named `blob://BUCKET/KEY` (the key is taken literally, `/`
//! included; no percent-decoding), and `-` is stdin or stdout. Any member
//! answers. A gRPC error prints as `Error: <status message>` on stderr with exit
//! code 1; a bad flag or URL exits 2; `fsck` also exits 1 when it finds problems.
//!
//! Uploads and downloads stream: `put` sends the file in 1 MiB pieces through a
//! small bounded queue, `get` writes each piece as it arrives into a scratch file
//! next to the destination, renamed over it once every byte is there.

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::Stream;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::group::{connect, runtime};
use crate::proto::blob::blob_client::BlobClient;
use crate::proto::blob::put_request::Part;
use crate::proto::blob::{
    Bucket, CopyRequest, CreateBucketRequest, CreateKeyRequest, CreateKeyResponse, DeleteBucketRequest,
    DeleteKeyRequest, DeleteRequest, FsckRequest, FsckResponse, GetRequest, HeadRequest, KeyInfo, ListBucketsRequest,
    ListKeysRequest, ListRequest, ObjectInfo, PutHeader, PutRequest,
};
use crate::server::cluster_view::human_size;

const SCHEME: &str = "blob://";
/// Bytes per data message of a put.
const PIECE_BYTES: usize = 1 << 20;
/// Pieces read ahead of the upload at most (with the one being read and the one
/// in flight, a put holds a few MiB whatever the file's size).
const PUT_QUEUE: usize = 2;
/// How long a put or get waits for any progress (a piece accepted or received,
/// or the answer after the last piece) before giving up.
const STALL: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(name = "concord blob", about = "The blob store: buckets and objects named blob://BUCKET/KEY")]
struct BlobArgs {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Timeout in milliseconds for connecting and for each call of mb, rb, ls,
    /// stat, rm and keys. put and get give up after 60s without progress; cp and
    /// fsck wait as long as the server works.
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
    /// Output format: table or json.
    #[arg(short = 'w', long = "write-out", default_value = "table", value_parser = ["table", "json"], global = true)]
    write_out: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Creates bucket blob://BUCKET.
    Mb { bucket: String },
    /// Deletes bucket blob://BUCKET, which must be empty.
    Rb { bucket: String },
    /// Lists the buckets, or the objects of blob://BUCKET[/PREFIX] one level
    /// deep (`PRE` lines for the levels below).
    Ls {
        url: Option<String>,
        /// Every object under the prefix, with its full key.
        #[arg(long, short = 'r')]
        recursive: bool,
    },
    /// Uploads FILE (`-`: stdin) to blob://BUCKET/KEY; a KEY that is empty or
    /// ends in `/` gets FILE's name appended.
    Put {
        file: String,
        url: String,
        /// The object's content type.
        #[arg(long)]
        content_type: Option<String>,
        /// User metadata as key=value (repeatable).
        #[arg(long = "metadata", short = 'm')]
        metadata: Vec<String>,
    },
    /// Downloads blob://BUCKET/KEY to FILE (`-`: stdout; a directory: the key's
    /// last part in it).
    Get {
        url: String,
        file: String,
        /// First byte to download.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to download from --offset (default: to the end).
        #[arg(long)]
        length: Option<u64>,
    },
    /// Shows blob://BUCKET/KEY's size, etag, content type, time, chunks and metadata.
    Stat { url: String },
    /// Deletes blob://BUCKET/KEY (deleting a missing key succeeds, as in S3).
    Rm { url: String },
    /// Copies blob://B1/K1 to blob://B2/K2 (a K2 that is empty or ends in `/`
    /// gets K1's last part appended).
    Cp { src: String, dst: String },
    /// Checks every chunk of every object (of blob://BUCKET, or of all buckets)
    /// on each of its replicas; exits 1 when it finds a problem.
    Fsck { bucket: Option<String> },
    /// Creates, lists and deletes access keys (for the S3 gateway).
    Keys {
        #[command(subcommand)]
        verb: KeysCommand,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Creates an access key; its secret is shown this once only.
    Create,
    /// Lists the access keys (id and creation time, never the secret).
    Ls,
    /// Deletes access key ACCESS_KEY_ID.
    Rm { access_key_id: String },
}

/// Why a command failed: a bad argument (exit 2), the server's answer or a
/// local file (exit 1), or stdout closed by its reader (`| head`; quiet, exit
/// 141 as if killed by SIGPIPE).
#[derive(Debug)]
enum Failure {
    Usage(String),
    Failed(String),
    Closed,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Failed(s.message().to_string())
    }
}

fn usage(e: impl Into<String>) -> Failure {
    Failure::Usage(e.into())
}

fn failed(e: impl Into<String>) -> Failure {
    Failure::Failed(e.into())
}

fn stdout_failed(e: std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::BrokenPipe => Failure::Closed,
        _ => failed(format!("stdout: {e}")),
    }
}

/// `blob://BUCKET[/KEY]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlobUrl {
    bucket: String,
    /// Possibly empty; may hold `/`.
    key: String,
}

impl BlobUrl {
    /// Any blob URL: the scheme (any case) and a bucket are required, the key is
    /// everything after the bucket's `/`, taken literally.
    fn parse(s: &str) -> Result<BlobUrl, Failure> {
        let bad = |why: String| usage(format!("{s:?}: {why} (expected blob://BUCKET[/KEY])"));
        let rest = match s.get(..SCHEME.len()) {
            Some(scheme) if scheme.eq_ignore_ascii_case(SCHEME) => &s[SCHEME.len()..],
            _ => return Err(bad("not a blob URL".into())),
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket".into()));
        }
        // S3's bucket alphabet (the server checks the rest of the rules); this
        // catches ports, credentials, queries and upper case early.
        if !bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-') {
            return Err(bad(format!("bucket {bucket:?} may hold only lowercase letters, digits, '.' and '-'")));
        }
        Ok(BlobUrl { bucket: bucket.into(), key: key.into() })
    }

    /// `blob://BUCKET/KEY` with a key.
    fn object(s: &str) -> Result<BlobUrl, Failure> {
        let u = BlobUrl::parse(s)?;
        match u.key.is_empty() {
            true => Err(usage(format!("{s:?}: no key (expected blob://BUCKET/KEY)"))),
            false => Ok(u),
        }
    }

    /// `blob://BUCKET` (a trailing `/` is allowed); the bucket's name.
    fn bucket(s: &str) -> Result<String, Failure> {
        let u = BlobUrl::parse(s)?;
        match u.key.is_empty() {
            true => Ok(u.bucket),
            false => Err(usage(format!("{s:?}: names an object (expected blob://BUCKET)"))),
        }
    }

    /// This URL, or (when its key is empty or ends in `/`) `name` under it.
    fn or_named(mut self, name: Option<&str>, what: &str) -> Result<BlobUrl, Failure> {
        if !self.key.is_empty() && !self.key.ends_with('/') {
            return Ok(self);
        }
        match name.filter(|n| !n.is_empty()) {
            Some(n) => {
                self.key.push_str(n);
                Ok(self)
            }
            None => Err(usage(format!("{self}: give the object's key ({what} has no name to use)"))),
        }
    }
}

impl std::fmt::Display for BlobUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.key.is_empty() {
            true => write!(f, "{SCHEME}{}", self.bucket),
            false => write!(f, "{SCHEME}{}/{}", self.bucket, self.key),
        }
    }
}

/// The last `/`-separated part of a key, unless it is empty, `.` or `..`.
fn last_part(key: &str) -> Option<&str> {
    key.rsplit('/').next().filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

/// How `ls` shows a key or common prefix: relative to the prefix's last `/`
/// (as `aws s3 ls` does), or whole with --recursive.
fn shown<'a>(prefix: &str, name: &'a str, recursive: bool) -> &'a str {
    if recursive {
        return name;
    }
    let dir = &prefix[..prefix.rfind('/').map_or(0, |i| i + 1)];
    name.strip_prefix(dir).unwrap_or(name)
}

/// ms since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::cli::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", sod / 3600, sod / 60 % 60, sod % 60)
}

fn metadata(pairs: &[String]) -> Result<HashMap<String, String>, Failure> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(usage(format!("--metadata {p:?}: expected key=value"))),
        })
        .collect()
}

fn object_json(o: &ObjectInfo) -> serde_json::Value {
    let metadata: BTreeMap<&String, &String> = o.metadata.iter().collect();
    json!({
        "bucket": o.bucket, "key": o.key, "size": o.size, "etag": o.etag, "content_type": o.content_type,
        "modified_ms": o.modified_ms, "chunks": o.chunks, "metadata": metadata,
    })
}

fn bucket_json(b: &Bucket) -> serde_json::Value {
    json!({ "name": b.name, "created_ms": b.created_ms })
}

fn object_text(o: &ObjectInfo) -> String {
    let url = BlobUrl { bucket: o.bucket.clone(), key: o.key.clone() };
    let chunks = match o.chunks {
        0 => "0 (stored inline)".to_string(),
        n => n.to_string(),
    };
    let mut out = format!(
        "Key:          {url}\n\
         Size:         {} ({})\n\
         ETag:         {}\n\
         Content-Type: {}\n\
         Modified:     {} UTC\n\
         Chunks:       {chunks}\n",
        o.size,
        human_size(i64::try_from(o.size).unwrap_or(i64::MAX)),
        o.etag,
        if o.content_type.is_empty() { "-" } else { &o.content_type },
        utc(o.modified_ms),
    );
    let metadata: BTreeMap<&String, &String> = o.metadata.iter().collect();
    if metadata.is_empty() {
        out += "Metadata:     -\n";
    } else {
        out += "Metadata:\n";
        for (k, v) in metadata {
            out += &format!("  {k}={v}\n");
        }
    }
    out
}

fn fsck_json(r: &FsckResponse) -> serde_json::Value {
    let problems: Vec<serde_json::Value> = r
        .problems
        .iter()
        .map(|p| {
            json!({
                "bucket": p.bucket, "key": p.key, "chunk": p.chunk, "problem": p.problem, "members": p.members,
            })
        })
        .collect();
    json!({ "objects": r.objects, "chunks": r.chunks, "problems": problems })
}

fn fsck_text(r: &FsckResponse) -> String {
    let mut out = format!("checked {} objects, {} chunks: {} problems\n", r.objects, r.chunks, r.problems.len());
    for p in &r.problems {
        out += &format!("{}/{} chunk {}: {} on {}\n", p.bucket, p.key, p.chunk, p.problem, p.members.join(","));
    }
    out
}

/// `keys create`'s answer: the only place the secret is ever shown.
fn created_key_json(k: &CreateKeyResponse) -> serde_json::Value {
    json!({ "access_key_id": k.access_key_id, "secret_access_key": k.secret_access_key, "created_ms": k.created_ms })
}

fn created_key_text(k: &CreateKeyResponse) -> String {
    format!(
        "access_key_id: {}\nsecret_access_key: {}\nThe secret access key is shown only once: store it now.\n",
        k.access_key_id, k.secret_access_key
    )
}

fn keys_json(keys: &[KeyInfo]) -> serde_json::Value {
    keys.iter().map(|k| json!({ "access_key_id": k.access_key_id, "created_ms": k.created_ms })).collect()
}

fn keys_text(keys: &[KeyInfo]) -> String {
    keys.iter().map(|k| format!("{} {}\n", utc(k.created_ms), k.access_key_id)).collect()
}

/// Writes to stdout, a failed write (a closed pipe) being an error rather than
/// `println!`'s panic (`ls` and `fsck` can print many lines).
fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(stdout_failed)
}

/// Runs `concord blob ...`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let args = match BlobArgs::try_parse_from(std::iter::once("concord blob".to_string()).chain(args.iter().cloned())) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let rt = runtime();
    let result = rt.block_on(run(args));
    // Not waiting for a read of stdin that a failed put left blocked.
    rt.shutdown_background();
    match result {
        Ok(code) => code,
        Err(Failure::Usage(e)) => {
            eprintln!("Error: {e}");
            2
        }
        Err(Failure::Failed(e)) => {
            eprintln!("Error: {e}");
            1
        }
        Err(Failure::Closed) => 141,
    }
}

type Client = BlobClient<Channel>;

/// Like [`connect`], but without a deadline on each call (connecting is still
/// bounded by `timeout`): an upload, a cross-bucket copy or an fsck lasts as long
/// as its bytes take.
async fn connect_untimed(endpoints: &[String], timeout: Duration) -> Result<Channel, String> {
    let mut last = String::from("no endpoints given");
    for e in endpoints {
        let url = if e.contains("://") { e.clone() } else { format!("http://{e}") };
        let endpoint = Channel::from_shared(url.clone()).map_err(|err| format!("{e}: {err}"))?;
        match endpoint.connect_timeout(timeout).connect().await {
            Ok(c) => return Ok(c),
            Err(err) => last = format!("{url}: {err}"),
        }
    }
    Err(last)
}

/// The options every verb connects with.
struct Conn {
    endpoints: Vec<String>,
    timeout: Duration,
}

impl Conn {
    /// A client whose calls each end within the timeout.
    async fn timed(&self) -> Result<Client, Failure> {
        Ok(BlobClient::new(connect(&self.endpoints, self.timeout).await.map_err(Failure::Failed)?))
    }

    /// A client whose calls last as long as the server works.
    async fn untimed(&self) -> Result<Client, Failure> {
        Ok(BlobClient::new(connect_untimed(&self.endpoints, self.timeout).await.map_err(Failure::Failed)?))
    }
}

/// Runs one verb; the exit code when it ran (1 for an fsck that found problems).
async fn run(args: BlobArgs) -> Result<i32, Failure> {
    let json = args.write_out == "json";
    let conn = Conn { endpoints: args.endpoints, timeout: Duration::from_millis(args.timeout_ms.max(1)) };
    match args.command {
        Command::Mb { bucket } => {
            let bucket = BlobUrl::bucket(&bucket)?;
            let r = conn.timed().await?.create_bucket(CreateBucketRequest { bucket: bucket.clone() }).await?;
            match json {
                true => println!(
                    "{}",
                    bucket_json(&r.into_inner().bucket.unwrap_or(Bucket { name: bucket, created_ms: 0 }))
                ),
                false => println!("make_bucket: {bucket}"),
            }
        }
        Command::Rb { bucket } => {
            let bucket = BlobUrl::bucket(&bucket)?;
            conn.timed().await?.delete_bucket(DeleteBucketRequest { bucket: bucket.clone() }).await?;
            match json {
                true => println!("{}", json!({ "removed_bucket": bucket })),
                false => println!("remove_bucket: {bucket}"),
            }
        }
        Command::Ls { url: None, recursive: _ } => {
            let buckets = conn.timed().await?.list_buckets(ListBucketsRequest {}).await?.into_inner().buckets;
            if json {
                let list: Vec<serde_json::Value> = buckets.iter().map(bucket_json).collect();
                println!("{}", json!({ "buckets": list }));
            } else {
                let lines: String = buckets.iter().map(|b| format!("{} {}\n", utc(b.created_ms), b.name)).collect();
                emit(&lines)?;
            }
        }
        Command::Ls { url: Some(url), recursive } => {
            let url = BlobUrl::parse(&url)?;
            ls(&mut conn.timed().await?, url, recursive, json).await?;
        }
        Command::Put { file, url, content_type, metadata: pairs } => {
            if file.get(..SCHEME.len()).is_some_and(|s| s.eq_ignore_ascii_case(SCHEME)) {
                return Err(usage(format!("{file:?} is an object: put uploads a local file (cp copies objects)")));
            }
            let name = (file != "-").then(|| Path::new(&file).file_name().and_then(|n| n.to_str())).flatten();
            let to = BlobUrl::parse(&url)?.or_named(name, &file)?;
            let header = PutHeader {
                bucket: to.bucket.clone(),
                key: to.key.clone(),
                content_type: content_type.unwrap_or_default(),
                metadata: metadata(&pairs)?,
            };
            let source: Pin<Box<dyn AsyncRead + Send>> = match file.as_str() {
                "-" => Box::pin(tokio::io::stdin()),
                path => {
                    let f = tokio::fs::File::open(path).await.map_err(|e| failed(format!("{path}: {e}")))?;
                    if f.metadata().await.is_ok_and(|m| m.is_dir()) {
                        return Err(usage(format!("{path} is a directory")));
                    }
                    Box::pin(f)
                }
            };
            let what = if file == "-" { "stdin" } else { file.as_str() };
            let o = put(&mut conn.untimed().await?, header, source, what).await?;
            match json {
                true => println!("{}", object_json(&o)),
                false => println!("upload: {file} to {to} ({} bytes, etag {})", o.size, o.etag),
            }
        }
        Command::Get { url, file, offset, length } => {
            let from = BlobUrl::object(&url)?;
            let dest = match file.as_str() {
                "-" => None,
                f => Some(destination(f, &from.key)?),
            };
            let mut c = conn.timed().await?;
            let request = GetRequest { bucket: from.bucket.clone(), key: from.key.clone(), offset, length };
            let o = tokio::select! {
                r = get(&mut c, request, dest.as_deref()) => r?,
                _ = tokio::signal::ctrl_c() => return Err(failed("interrupted")),
            };
            match (dest, json) {
                (None, _) => {}
                (Some(_), true) => println!("{}", object_json(&o)),
                (Some(d), false) => println!("download: {from} to {}", d.display()),
            }
        }
        Command::Stat { url } => {
            let u = BlobUrl::object(&url)?;
            let r = conn.timed().await?.head(HeadRequest { bucket: u.bucket, key: u.key }).await?.into_inner();
            let o = r.object.ok_or_else(|| failed("the server answered no object info"))?;
            match json {
                true => println!("{}", object_json(&o)),
                false => print!("{}", object_text(&o)),
            }
        }
        Command::Rm { url } => {
            let u = BlobUrl::object(&url)?;
            let request = DeleteRequest { bucket: u.bucket.clone(), key: u.key.clone() };
            conn.timed().await?.delete(request).await?;
            match json {
                true => println!("{}", json!({ "deleted": u.to_string(), "bucket": u.bucket, "key": u.key })),
                false => println!("delete: {u}"),
            }
        }
        Command::Cp { src, dst } => {
            let from = BlobUrl::object(&src)?;
            let to = BlobUrl::parse(&dst)?.or_named(last_part(&from.key), &src)?;
            let request = CopyRequest {
                src_bucket: from.bucket.clone(),
                src_key: from.key.clone(),
                bucket: to.bucket.clone(),
                key: to.key.clone(),
            };
            let r = conn.untimed().await?.copy(request).await?.into_inner();
            let o = r.object.ok_or_else(|| failed("the server answered no object info"))?;
            match json {
                true => println!("{}", object_json(&o)),
                false => println!("copy: {from} to {to} ({} bytes, etag {})", o.size, o.etag),
            }
        }
        Command::Fsck { bucket } => {
            let bucket = bucket.as_deref().map(BlobUrl::bucket).transpose()?.unwrap_or_default();
            let r = conn.untimed().await?.fsck(FsckRequest { bucket }).await?.into_inner();
            match json {
                true => emit(&format!("{}\n", fsck_json(&r)))?,
                false => emit(&fsck_text(&r))?,
            }
            return Ok(if r.problems.is_empty() { 0 } else { 1 });
        }
        Command::Keys { verb: KeysCommand::Create } => {
            let k = conn.timed().await?.create_key(CreateKeyRequest {}).await?.into_inner();
            match json {
                true => emit(&format!("{}\n", created_key_json(&k)))?,
                false => emit(&created_key_text(&k))?,
            }
        }
        Command::Keys { verb: KeysCommand::Ls } => {
            let keys = conn.timed().await?.list_keys(ListKeysRequest {}).await?.into_inner().keys;
            match json {
                true => emit(&format!("{}\n", keys_json(&keys)))?,
                false => emit(&keys_text(&keys))?,
            }
        }
        Command::Keys { verb: KeysCommand::Rm { access_key_id } } => {
            if access_key_id.is_empty() {
                return Err(usage("keys rm: give the access key id"));
            }
            let request = DeleteKeyRequest { access_key_id: access_key_id.clone() };
            conn.timed().await?.delete_key(request).await?;
            match json {
                true => println!("{}", json!({ "deleted_key": access_key_id })),
                false => println!("delete key: {access_key_id}"),
            }
        }
    }
    Ok(0)
}

/// `ls blob://BUCKET[/PREFIX]`: every page, printed as it comes (or gathered
/// into one JSON document).
async fn ls(c: &mut Client, url: BlobUrl, recursive: bool, json: bool) -> Result<(), Failure> {
    let delimiter = if recursive { "" } else { "/" };
    let (mut objects, mut prefixes) = (Vec::new(), Vec::new());
    let mut start_after = String::new();
    loop {
        let request = ListRequest {
            bucket: url.bucket.clone(),
            prefix: url.key.clone(),
            delimiter: delimiter.into(),
            start_after: start_after.clone(),
            max_keys: 0,
        };
        let page = c.list(request).await?.into_inner();
        if json {
            prefixes.extend(page.common_prefixes);
            objects.extend(page.objects.iter().map(object_json));
        } else {
            let mut lines = String::new();
            for p in &page.common_prefixes {
                lines += &format!("{:>30} {}\n", "PRE", shown(&url.key, p, recursive));
            }
            for o in &page.objects {
                lines += &format!("{} {:>10} {}\n", utc(o.modified_ms), o.size, shown(&url.key, &o.key, recursive));
            }
            emit(&lines)?;
        }
        if !page.truncated {
            break;
        }
        // Keys come in order: a page that does not move forward would loop forever.
        if page.next_start_after <= start_after {
            return Err(failed(format!("the listing stopped advancing after {start_after:?}")));
        }
        start_after = page.next_start_after;
    }
    if json {
        let doc = json!({
            "bucket": url.bucket, "prefix": url.key, "delimiter": delimiter,
            "common_prefixes": prefixes, "objects": objects,
        });
        emit(&format!("{doc}\n"))?;
    }
    Ok(())
}

/// What the reader of a put hands the upload.
enum Piece {
    Message(PutRequest),
    /// Every byte was read: the request stream may end.
    End,
}

/// The request stream of a put. It ends only after [`Piece::End`]: if the reader
/// fails (and drops its sender) the stream never ends, so the server can never
/// take a truncated file for the whole one; the call is dropped instead.
fn put_stream(rx: mpsc::Receiver<Piece>) -> impl Stream<Item = PutRequest> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Some(Piece::Message(m)) => Some((m, rx)),
            Some(Piece::End) => None,
            None => futures::future::pending().await,
        }
    })
}

/// Reads `source` in [`PIECE_BYTES`] pieces into the upload queue, the header
/// first, then [`Piece::End`].
async fn feed(
    tx: mpsc::Sender<Piece>,
    mut source: impl AsyncRead + Unpin,
    header: PutHeader,
    what: &str,
) -> Result<(), Failure> {
    let send = |piece: Piece| {
        let tx = &tx;
        async move {
            match tokio::time::timeout(STALL, tx.send(piece)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(failed("the upload was cut off")),
                Err(_) => Err(failed(format!("the upload made no progress for {}s", STALL.as_secs()))),
            }
        }
    };
    send(Piece::Message(PutRequest { part: Some(Part::Header(header)) })).await?;
    loop {
        let mut buf = vec![0u8; PIECE_BYTES];
        let mut len = 0;
        while len < PIECE_BYTES {
            match source.read(&mut buf[len..]).await {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(format!("{what}: {e}"))),
            }
        }
        buf.truncate(len);
        if len > 0 {
            send(Piece::Message(PutRequest { part: Some(Part::Data(buf)) })).await?;
        }
        if len < PIECE_BYTES {
            return send(Piece::End).await;
        }
    }
}

/// Uploads `source` as the object `header` names; its info once stored.
async fn put(
    c: &mut Client,
    header: PutHeader,
    source: Pin<Box<dyn AsyncRead + Send>>,
    what: &str,
) -> Result<ObjectInfo, Failure> {
    let (tx, rx) = mpsc::channel(PUT_QUEUE);
    let call = c.put(put_stream(rx));
    let reader = feed(tx, source, header, what);
    tokio::pin!(call, reader);
    // The server's answer before the reader is done can only be an error; a
    // reader's error drops the call unfinished.
    let answer = tokio::select! {
        r = &mut call => r,
        r = &mut reader => {
            r?;
            match tokio::time::timeout(STALL, &mut call).await {
                Ok(r) => r,
                Err(_) => return Err(failed(format!("no answer {}s after the upload", STALL.as_secs()))),
            }
        }
    };
    answer?.into_inner().object.ok_or_else(|| failed("the server answered no object info"))
}

/// The file a get writes: FILE, or the key's last part in FILE when that is a
/// directory.
fn destination(file: &str, key: &str) -> Result<PathBuf, Failure> {
    let path = PathBuf::from(file);
    if !path.is_dir() && !file.ends_with('/') {
        return Ok(path);
    }
    match last_part(key) {
        Some(name) => Ok(path.join(name)),
        None => Err(usage(format!("key {key:?} has no name to save under {file}: give a file name"))),
    }
}

/// A scratch file next to a get's destination, renamed over it by
/// [`Scratch::finish`] and removed if dropped before.
struct Scratch {
    file: std::fs::File,
    path: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Scratch {
    fn create(dest: &Path) -> Result<Scratch, Failure> {
        let name = dest
            .file_name()
            .ok_or_else(|| usage(format!("{}: not a file name", dest.display())))?
            .to_string_lossy()
            .into_owned();
        let path = dest.with_file_name(format!(".{name}.{}.part", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| failed(format!("{}: {e}", path.display())))?;
        Ok(Scratch { file, path, dest: dest.to_path_buf(), done: false })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), Failure> {
        self.file.write_all(data).map_err(|e| failed(format!("{}: {e}", self.path.display())))
    }

    fn finish(mut self) -> Result<(), Failure> {
        self.file.sync_all().map_err(|e| failed(format!("{}: {e}", self.path.display())))?;
        std::fs::rename(&self.path, &self.dest).map_err(|e| failed(format!("{}: {e}", self.dest.display())))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where a get's bytes go.
enum Sink {
    Stdout(std::io::Stdout),
    File(Scratch),
}

impl Sink {
    fn write(&mut self, data: &[u8]) -> Result<(), Failure> {
        match self {
            Sink::Stdout(out) => out.write_all(data).map_err(stdout_failed),
            Sink::File(f) => f.write(data),
        }
    }

    fn finish(self) -> Result<(), Failure> {
        match self {
            Sink::Stdout(mut out) => out.flush().map_err(stdout_failed),
            Sink::File(f) => f.finish(),
        }
    }
}

/// Downloads into `dest` (stdout when `None`), checking that exactly the bytes
/// asked for arrived; the object's info.
async fn get(c: &mut Client, request: GetRequest, dest: Option<&Path>) -> Result<ObjectInfo, Failure> {
    let (offset, length) = (request.offset, request.length);
    let mut stream = c.get(request).await?.into_inner();
    let mut next = async || match tokio::time::timeout(STALL, stream.message()).await {
        Ok(r) => r.map_err(Failure::from),
        Err(_) => Err(failed(format!("the download made no progress for {}s", STALL.as_secs()))),
    };
    let first = next().await?.ok_or_else(|| failed("the server answered nothing"))?;
    let o = first.object.ok_or_else(|| failed("the server's first answer had no object info"))?;
    let want = length.unwrap_or_else(|| o.size.saturating_sub(offset));
    let mut sink = match dest {
        None => Sink::Stdout(std::io::stdout()),
        Some(d) => Sink::File(Scratch::create(d)?),
    };
    let mut got = 0u64;
    let mut data = first.data;
    loop {
        got += data.len() as u64;
        if got > want {
            return Err(failed(format!("the server sent more than the {want} bytes asked for")));
        }
        sink.write(&data)?;
        match next().await? {
            Some(m) => data = m.data,
            None => break,
        }
    }
    if got != want {
        return Err(failed(format!("the download ended after {got} of {want} bytes")));
    }
    sink.finish()?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn url(s: &str) -> Option<(String, String)> {
        BlobUrl::parse(s).ok().map(|u| (u.bucket, u.key))
    }

    fn pair(b: &str, k: &str) -> Option<(String, String)> {
        Some((b.into(), k.into()))
    }

    #[test]
    fn parses_blob_urls() {
        assert_eq!(url("blob://photos"), pair("photos", ""));
        assert_eq!(url("blob://photos/"), pair("photos", ""));
        assert_eq!(url("blob://photos/cat.jpg"), pair("photos", "cat.jpg"));
        assert_eq!(url("blob://photos/2024/01/cat.jpg"), pair("photos", "2024/01/cat.jpg"));
        assert_eq!(url("blob://photos/dir/"), pair("photos", "dir/"));
        assert_eq!(url("blob://photos//x"), pair("photos", "/x"));
        assert_eq!(url("BLOB://my-bucket.1/k y?z#w"), pair("my-bucket.1", "k y?z#w"));
        assert_eq!(url("blob://b/ключ"), pair("b", "ключ"));
        assert_eq!(url("blob://b/%41"), pair("b", "%41"));
        for bad in [
            "",
            "blob",
            "blob:/",
            "blob://",
            "blob:///key",
            "blob:/b/k",
            "s3://b/k",
            "b/k",
            "/tmp/blob://b",
            "blöb://b/k",
            "blob://Photos/k",
            "blob://b:80/k",
            "blob://user@b/k",
            "blob://b?x=1",
            "blob://b k/x",
        ] {
            assert!(url(bad).is_none(), "{bad:?} parsed");
        }
        assert!(matches!(BlobUrl::parse("s3://b"), Err(Failure::Usage(e)) if e.contains("blob://BUCKET")));
    }

    #[test]
    fn objects_need_keys_and_buckets_none() {
        assert_eq!(BlobUrl::object("blob://b/k/").ok(), Some(BlobUrl { bucket: "b".into(), key: "k/".into() }));
        assert!(matches!(BlobUrl::object("blob://b"), Err(Failure::Usage(e)) if e.contains("no key")));
        assert!(BlobUrl::object("blob://b/").is_err());
        assert_eq!(BlobUrl::bucket("blob://b").ok().as_deref(), Some("b"));
        assert_eq!(BlobUrl::bucket("blob://b/").ok().as_deref(), Some("b"));
        assert!(matches!(BlobUrl::bucket("blob://b/k"), Err(Failure::Usage(e)) if e.contains("names an object")));
        assert!(BlobUrl::bucket("b").is_err());
    }

    #[test]
    fn names_and_display() {
        let u = |s: &str| BlobUrl::parse(s).ok().unwrap_or(BlobUrl { bucket: String::new(), key: String::new() });
        assert_eq!(u("blob://b").or_named(Some("a.txt"), "a.txt").ok().map(|u| u.key), Some("a.txt".into()));
        assert_eq!(u("blob://b/d/").or_named(Some("a.txt"), "a.txt").ok().map(|u| u.key), Some("d/a.txt".into()));
        assert_eq!(u("blob://b/x").or_named(Some("a.txt"), "a.txt").ok().map(|u| u.key), Some("x".into()));
        assert!(u("blob://b/").or_named(None, "-").is_err());
        assert_eq!(u("blob://b/a/b").to_string(), "blob://b/a/b");
        assert_eq!(u("blob://b/").to_string(), "blob://b");
        assert_eq!(last_part("a/b/c.txt"), Some("c.txt"));
        assert_eq!(last_part("a/"), None);
        assert_eq!(last_part("a/.."), None);
        assert_eq!(destination("out.bin", "a/b").ok(), Some(PathBuf::from("out.bin")));
        let dir = std::env::temp_dir();
        let d = dir.to_string_lossy().into_owned();
        assert_eq!(destination(&d, "a/b.txt").ok(), Some(dir.join("b.txt")));
        assert!(destination(&d, "a/").is_err());
    }

    #[test]
    fn listing_names_and_times() {
        assert_eq!(shown("", "a/b", false), "a/b");
        assert_eq!(shown("dir/", "dir/sub/", false), "sub/");
        assert_eq!(shown("dir/f", "dir/file", false), "file");
        assert_eq!(shown("dir", "dir/", false), "dir/");
        assert_eq!(shown("dir/", "dir/file", true), "dir/file");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_796_655_731_714), "2026-12-07 15:02:11");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert!(matches!(metadata(&["a=b=c".into()]), Ok(m) if m.get("a").map(String::as_str) == Some("b=c")));
        assert!(metadata(&["=x".into()]).is_err());
    }

    #[test]
    fn keys_verbs_and_output() {
        let parse = |a: &[&str]| BlobArgs::try_parse_from(std::iter::once("concord blob").chain(a.iter().copied()));
        assert!(matches!(
            parse(&["keys", "create"]).map(|a| a.command),
            Ok(Command::Keys { verb: KeysCommand::Create })
        ));
        let a = parse(&["keys", "ls", "-w", "json"]).ok();
        assert!(
            matches!(&a, Some(a) if a.write_out == "json" && matches!(a.command, Command::Keys { verb: KeysCommand::Ls }))
        );
        assert!(matches!(
            parse(&["-w", "json", "keys", "rm", "AKID1"]).map(|a| a.command),
            Ok(Command::Keys { verb: KeysCommand::Rm { access_key_id } }) if access_key_id == "AKID1"
        ));
        assert!(parse(&["keys", "rm"]).is_err());
        assert!(parse(&["keys", "create", "x"]).is_err());
        assert!(parse(&["keys"]).is_err());

        let k = CreateKeyResponse { access_key_id: "AK1".into(), secret_access_key: "s/e+c".into(), created_ms: 5 };
        let v = created_key_json(&k);
        assert_eq!(v, json!({ "access_key_id": "AK1", "secret_access_key": "s/e+c", "created_ms": 5 }));
        assert_eq!(v.as_object().map(|o| o.len()), Some(3));
        let t = created_key_text(&k);
        assert!(t.starts_with("access_key_id: AK1\nsecret_access_key: s/e+c\n") && t.contains("only once"));

        let keys = [
            KeyInfo { access_key_id: "AK1".into(), created_ms: 0 },
            KeyInfo { access_key_id: "AK2".into(), created_ms: 951_782_400_000 },
        ];
        assert_eq!(keys_text(&keys), "1970-01-01 00:00:00 AK1\n2000-02-29 00:00:00 AK2\n");
        assert_eq!(keys_text(&[]), "");
        let j = keys_json(&keys);
        assert_eq!(
            j,
            json!([{ "access_key_id": "AK1", "created_ms": 0 }, { "access_key_id": "AK2", "created_ms": 951_782_400_000_i64 }])
        );
        assert_eq!(keys_json(&[]).to_string(), "[]");
    }

    /// A reader that fails.
    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::Error::other("disk on fire")))
        }
    }

    fn sizes(messages: &[PutRequest]) -> Vec<Option<usize>> {
        messages
            .iter()
            .map(|m| match &m.part {
                Some(Part::Data(d)) => Some(d.len()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn put_streams_pieces_and_never_ends_a_failed_read() {
        let header = PutHeader { bucket: "b".into(), key: "k".into(), ..Default::default() };
        let (tx, rx) = mpsc::channel(PUT_QUEUE);
        let file = std::io::Cursor::new(vec![7u8; 2 * PIECE_BYTES + 5]);
        let (fed, sent) = tokio::join!(feed(tx, file, header.clone(), "f"), put_stream(rx).collect::<Vec<_>>());
        assert!(fed.is_ok());
        assert_eq!(sizes(&sent), vec![None, Some(PIECE_BYTES), Some(PIECE_BYTES), Some(5)]);

        let (tx, rx) = mpsc::channel(PUT_QUEUE);
        let empty = std::io::Cursor::new(Vec::new());
        let (fed, sent) = tokio::join!(feed(tx, empty, header.clone(), "f"), put_stream(rx).collect::<Vec<_>>());
        assert!(fed.is_ok());
        assert_eq!(sizes(&sent), vec![None]);

        // A read failing after one whole piece: the piece went, then the stream
        // stays open (it must not end as if the file were complete).
        let (tx, rx) = mpsc::channel(PUT_QUEUE);
        let file = std::io::Cursor::new(vec![1u8; PIECE_BYTES + 10]).chain(Broken);
        let fed = feed(tx, file, header, "f").await;
        assert!(matches!(fed, Err(Failure::Failed(e)) if e.contains("disk on fire")));
        let mut stream = Box::pin(put_stream(rx));
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.extend(stream.next().await);
        }
        assert_eq!(sizes(&seen), vec![None, Some(PIECE_BYTES)]);
        let end = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(end.is_err(), "the stream ended after a failed read");
    }
}
