//! Redis Streams commands from their arguments, with Redis 7.0's arity checks,
//! option grammar and error strings (observed against redis-server 7.0.15; the
//! session in `tests/redis/streams_session.py` compares the two).

use crate::streams::model::{
    ClaimOptions, GroupRead, GroupStart, IdSpec, StreamCommand, StreamId, Trim, TrimStrategy, DEFAULT_APPROX_LIMIT,
};

pub const ERR_INVALID_ID: &str = "ERR Invalid stream ID specified as stream command argument";
pub const ERR_NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub const ERR_SYNTAX: &str = "ERR syntax error";
const ERR_UNBALANCED: &str =
    "ERR Unbalanced XREAD list of streams: for each stream key an ID or '$' must be specified.";

/// A parsed command (the gateway adds the clock to writes).
#[derive(Debug, Clone)]
pub enum Request {
    /// A write to one stream; `now_ms` is filled in by the gateway.
    Write(StreamCommand),
    Del(Vec<Vec<u8>>),
    Len(Vec<u8>),
    Range {
        key: Vec<u8>,
        from: StreamId,
        to: StreamId,
        count: Option<u64>,
        reverse: bool,
    },
    Read {
        count: Option<u64>,
        block_ms: Option<u64>,
        streams: Vec<(Vec<u8>, ReadFrom)>,
    },
    ReadGroup {
        group: Vec<u8>,
        consumer: Vec<u8>,
        count: Option<u64>,
        block_ms: Option<u64>,
        no_ack: bool,
        streams: Vec<(Vec<u8>, GroupRead)>,
    },
    PendingSummary {
        key: Vec<u8>,
        group: Vec<u8>,
    },
    PendingRange {
        key: Vec<u8>,
        group: Vec<u8>,
        min_idle_ms: Option<u64>,
        from: StreamId,
        to: StreamId,
        count: u64,
        consumer: Option<Vec<u8>>,
    },
    InfoStream(Vec<u8>),
    /// XINFO STREAM key FULL [COUNT n] (0: everything).
    InfoStreamFull {
        key: Vec<u8>,
        count: u64,
    },
    Exists(Vec<Vec<u8>>),
    Type(Vec<u8>),
    /// XGROUP HELP, XINFO HELP: lines of status replies.
    Help(&'static [&'static str]),
    InfoGroups(Vec<u8>),
    InfoConsumers {
        key: Vec<u8>,
        group: Vec<u8>,
    },
}

impl Request {
    /// The streams the command names.
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            Request::Write(cmd) => vec![cmd.key()],
            Request::Del(keys) | Request::Exists(keys) => keys.iter().map(Vec::as_slice).collect(),
            Request::Len(key)
            | Request::Range { key, .. }
            | Request::PendingSummary { key, .. }
            | Request::PendingRange { key, .. }
            | Request::InfoStream(key)
            | Request::InfoStreamFull { key, .. }
            | Request::InfoGroups(key)
            | Request::InfoConsumers { key, .. }
            | Request::Type(key) => vec![key.as_slice()],
            Request::Read { streams, .. } => streams.iter().map(|(k, _)| k.as_slice()).collect(),
            Request::ReadGroup { streams, .. } => streams.iter().map(|(k, _)| k.as_slice()).collect(),
            Request::Help(_) => Vec::new(),
        }
    }
}

/// Where an XREAD starts in one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// `$`: after the stream's last id when the read starts.
    Last,
    After(StreamId),
}

/// A command this gateway does not know, or a parse failure: the error reply.
pub type Failure = String;

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

fn wrong_args(name: &str) -> Failure {
    format!("ERR wrong number of arguments for '{name}' command")
}

/// Redis's `string2ll`: optional '-', digits, no spaces or '+', no leading zeros
/// except "0" itself, within i64.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

fn integer(b: &[u8]) -> Result<i64, Failure> {
    parse_i64(b).ok_or_else(|| ERR_NOT_INTEGER.to_string())
}

/// Redis's `string2ull` for id parts: decimal digits only (leading zeros allowed).
fn u64_part(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// An id `ms-seq` or `ms` (`missing_seq` for the latter); `-` and `+` when `strict` is false.
fn stream_id(b: &[u8], missing_seq: u64, strict: bool) -> Result<StreamId, Failure> {
    let s = std::str::from_utf8(b).map_err(|_| ERR_INVALID_ID.to_string())?;
    if !strict && s == "-" {
        return Ok(StreamId::MIN);
    }
    if !strict && s == "+" {
        return Ok(StreamId::MAX);
    }
    let (ms, seq) = match s.split_once('-') {
        Some((ms, seq)) => (u64_part(ms), u64_part(seq)),
        None => (u64_part(s), Some(missing_seq)),
    };
    match (ms, seq) {
        (Some(ms), Some(seq)) => Ok(StreamId::new(ms, seq)),
        _ => Err(ERR_INVALID_ID.to_string()),
    }
}

/// A strict id (no `-`/`+`), seq 0 when missing.
pub fn strict_id(b: &[u8]) -> Result<StreamId, Failure> {
    stream_id(b, 0, true)
}

/// An interval bound: `-`, `+`, an id, or `(id` (exclusive).
fn bound(b: &[u8], start: bool) -> Result<StreamId, Failure> {
    let missing_seq = if start { 0 } else { u64::MAX };
    match b.strip_prefix(b"(") {
        Some(rest) => {
            let id = stream_id(rest, missing_seq, true)?;
            let moved = if start { id.next() } else { id.prev() };
            moved.ok_or_else(|| format!("ERR invalid {} ID for the interval", if start { "start" } else { "end" }))
        }
        None => stream_id(b, missing_seq, false),
    }
}

fn count_opt(b: &[u8]) -> Result<u64, Failure> {
    Ok(integer(b)?.max(0) as u64)
}

fn block_opt(b: &[u8]) -> Result<u64, Failure> {
    let ms = parse_i64(b).ok_or_else(|| "ERR timeout is not an integer or out of range".to_string())?;
    if ms < 0 {
        return Err("ERR timeout is negative".into());
    }
    Ok(ms as u64)
}

/// The trimming options of XADD and XTRIM, from `args[i..]`; returns where the
/// options end (XADD's id). `xtrim`: every argument must be an option.
fn trim_options(args: &[Vec<u8>], mut i: usize, xadd: bool) -> Result<(Option<Trim>, bool, usize), Failure> {
    let mut strategy = None;
    let mut approx = false;
    let mut limit: Option<i64> = None;
    let mut no_mkstream = false;
    while i < args.len() {
        let opt = upper(&args[i]);
        let more = i + 1 < args.len();
        if xadd && opt == "NOMKSTREAM" {
            no_mkstream = true;
            i += 1;
        } else if (opt == "MAXLEN" || opt == "MINID") && more {
            if strategy.is_some() {
                return Err("ERR syntax error, MAXLEN and MINID options at the same time are not compatible".into());
            }
            i += 1;
            let next = args[i].as_slice();
            if (next == b"~" || next == b"=") && i + 1 < args.len() {
                approx = next == b"~";
                i += 1;
            }
            strategy = Some(if opt == "MAXLEN" {
                let n = integer(&args[i])?;
                if n < 0 {
                    return Err("ERR The MAXLEN argument must be >= 0.".into());
                }
                TrimStrategy::MaxLen(n as u64)
            } else {
                TrimStrategy::MinId(strict_id(&args[i])?)
            });
            i += 1;
        } else if opt == "LIMIT" && more {
            let n = integer(&args[i + 1])?;
            if n < 0 {
                return Err("ERR The LIMIT argument must be >= 0.".into());
            }
            limit = Some(n);
            i += 2;
        } else if xadd {
            break;
        } else {
            return Err(ERR_SYNTAX.into());
        }
    }
    if limit.is_some() && strategy.is_none() {
        return Err("ERR syntax error, LIMIT cannot be used without specifying a trimming strategy".into());
    }
    if limit.is_some() && !approx {
        return Err("ERR syntax error, LIMIT cannot be used without the special ~ option".into());
    }
    let limit = match limit {
        Some(0) => None,
        Some(n) => Some(n as u64),
        None if approx => Some(DEFAULT_APPROX_LIMIT),
        None => None,
    };
    Ok((strategy.map(|strategy| Trim { strategy, approx, limit }), no_mkstream, i))
}

fn xadd(args: &[Vec<u8>]) -> Result<Request, Failure> {
    let key = args[1].clone();
    let (trim, no_mkstream, i) = trim_options(args, 2, true)?;
    let rest = &args[i..];
    if rest.len() < 3 || !(rest.len() - 1).is_multiple_of(2) {
        return Err(wrong_args("xadd"));
    }
    let id = match rest[0].as_slice() {
        b"*" => IdSpec::Auto,
        raw => match raw.strip_suffix(b"-*") {
            Some(ms) => IdSpec::AutoSeq(
                std::str::from_utf8(ms).ok().and_then(u64_part).ok_or_else(|| ERR_INVALID_ID.to_string())?,
            ),
            None => IdSpec::Explicit(strict_id(raw)?),
        },
    };
    let fields = rest[1..].chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
    Ok(Request::Write(StreamCommand::Add { key, id, fields, no_mkstream, trim, now_ms: 0 }))
}

fn range(args: &[Vec<u8>], reverse: bool) -> Result<Request, Failure> {
    let key = args[1].clone();
    let (first, second) = (&args[2], &args[3]);
    let (from, to) = if reverse {
        (bound(second, true)?, bound(first, false)?)
    } else {
        (bound(first, true)?, bound(second, false)?)
    };
    let count = match &args[4..] {
        [] => None,
        [opt, n] if upper(opt) == "COUNT" => Some(count_opt(n)?),
        _ => return Err(ERR_SYNTAX.into()),
    };
    Ok(Request::Range { key, from, to, count, reverse })
}

/// XREAD and XREADGROUP's options and streams, from `args[i..]`.
struct ReadArgs {
    count: Option<u64>,
    block_ms: Option<u64>,
    no_ack: bool,
    keys: Vec<Vec<u8>>,
    ids: Vec<Vec<u8>>,
}

fn read_args(args: &[Vec<u8>], mut i: usize, group: bool, name: &str) -> Result<ReadArgs, Failure> {
    let mut out = ReadArgs { count: None, block_ms: None, no_ack: false, keys: Vec::new(), ids: Vec::new() };
    while i < args.len() {
        let opt = upper(&args[i]);
        let more = i + 1 < args.len();
        match opt.as_str() {
            "COUNT" if more => {
                let n = integer(&args[i + 1])?;
                out.count = (n > 0).then_some(n as u64);
                i += 2;
            }
            "BLOCK" if more => {
                out.block_ms = Some(block_opt(&args[i + 1])?);
                i += 2;
            }
            "NOACK" if group => {
                out.no_ack = true;
                i += 1;
            }
            "STREAMS" => {
                let rest = &args[i + 1..];
                if rest.is_empty() {
                    return Err(wrong_args(name));
                }
                if !rest.len().is_multiple_of(2) {
                    return Err(ERR_UNBALANCED.into());
                }
                let half = rest.len() / 2;
                out.keys = rest[..half].to_vec();
                out.ids = rest[half..].to_vec();
                return Ok(out);
            }
            _ => return Err(ERR_SYNTAX.into()),
        }
    }
    Err(ERR_SYNTAX.into())
}

fn xread(args: &[Vec<u8>]) -> Result<Request, Failure> {
    let r = read_args(args, 1, false, "xread")?;
    let mut streams = Vec::new();
    for (key, id) in r.keys.into_iter().zip(r.ids) {
        let from = match id.as_slice() {
            b"$" => ReadFrom::Last,
            b">" => return Err(
                "ERR The > ID can be specified only when calling XREADGROUP using the GROUP <group> <consumer> option."
                    .into(),
            ),
            raw => ReadFrom::After(stream_id(raw, 0, true)?),
        };
        streams.push((key, from));
    }
    Ok(Request::Read { count: r.count, block_ms: r.block_ms, streams })
}

fn xreadgroup(args: &[Vec<u8>]) -> Result<Request, Failure> {
    if upper(&args[1]) != "GROUP" {
        return Err(wrong_args("xreadgroup"));
    }
    let (group, consumer) = (args[2].clone(), args[3].clone());
    let r = read_args(args, 4, true, "xreadgroup")?;
    let mut streams = Vec::new();
    for (key, id) in r.keys.into_iter().zip(r.ids) {
        let from = match id.as_slice() {
            b">" => GroupRead::New,
            b"$" => return Err("ERR The $ ID is meaningless in the context of XREADGROUP: you want to read the history of this consumer by specifying a proper ID, or use the > ID to get new messages. The $ ID would just return an empty result set.".into()),
            raw => GroupRead::History(stream_id(raw, 0, true)?),
        };
        streams.push((key, from));
    }
    Ok(Request::ReadGroup { group, consumer, count: r.count, block_ms: r.block_ms, no_ack: r.no_ack, streams })
}

fn ids(args: &[Vec<u8>]) -> Result<Vec<StreamId>, Failure> {
    args.iter().map(|a| strict_id(a)).collect()
}

fn group_start(b: &[u8]) -> Result<GroupStart, Failure> {
    match b {
        b"$" => Ok(GroupStart::Last),
        raw => Ok(GroupStart::At(strict_id(raw)?)),
    }
}

fn entries_read(b: &[u8]) -> Result<Option<u64>, Failure> {
    let n = integer(b)?;
    if n < -1 {
        return Err("ERR value for ENTRIESREAD must be positive or -1".into());
    }
    Ok((n >= 0).then_some(n as u64))
}

const XGROUP_HELP: &[&str] = &[
    "XGROUP <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "CREATE <key> <groupname> <id|$> [option]",
    "    Create a new consumer group. Options are:",
    "    * MKSTREAM",
    "      Create the empty stream if it does not exist.",
    "    * ENTRIESREAD entries_read",
    "      Set the group's entries_read counter (internal use).",
    "CREATECONSUMER <key> <groupname> <consumer>",
    "    Create a new consumer in the specified group.",
    "DELCONSUMER <key> <groupname> <consumer>",
    "    Remove the specified consumer.",
    "DESTROY <key> <groupname>",
    "    Remove the specified group.",
    "SETID <key> <groupname> <id|$> [ENTRIESREAD entries_read]",
    "    Set the current group ID and entries_read counter.",
    "HELP",
    "    Prints this help.",
];

const XINFO_HELP: &[&str] = &[
    "XINFO <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "CONSUMERS <key> <groupname>",
    "    Show consumers of <groupname>.",
    "GROUPS <key>",
    "    Show the stream consumer groups.",
    "STREAM <key> [FULL [COUNT <count>]",
    "    Show information about the stream.",
    "HELP",
    "    Prints this help.",
];

fn xgroup(args: &[Vec<u8>]) -> Result<Request, Failure> {
    let sub = upper(&args[1]);
    if sub == "HELP" && args.len() == 2 {
        return Ok(Request::Help(XGROUP_HELP));
    }
    let typed = String::from_utf8_lossy(&args[1]).into_owned();
    let (min, max) = match sub.as_str() {
        "CREATE" => (5, 8),
        "SETID" => (5, 7),
        "DESTROY" => (4, 4),
        "CREATECONSUMER" | "DELCONSUMER" => (5, 5),
        _ => return Err(format!("ERR unknown subcommand '{typed}'. Try XGROUP HELP.")),
    };
    if args.len() < min {
        return Err(wrong_args(&format!("xgroup|{}", sub.to_ascii_lowercase())));
    }
    let bad_options = || format!("ERR unknown subcommand or wrong number of arguments for '{typed}'. Try XGROUP HELP.");
    if args.len() > max {
        return Err(bad_options());
    }
    let (key, group) = (args[2].clone(), args[3].clone());
    let cmd = match sub.as_str() {
        "CREATE" | "SETID" => {
            let start = group_start(&args[4])?;
            let mut mkstream = false;
            let mut read = None;
            let mut i = 5;
            while i < args.len() {
                match upper(&args[i]).as_str() {
                    "MKSTREAM" if sub == "CREATE" => i += 1,
                    "ENTRIESREAD" if i + 1 < args.len() => {
                        read = entries_read(&args[i + 1])?;
                        i += 2;
                        continue;
                    }
                    _ => return Err(bad_options()),
                }
                mkstream = true;
            }
            if sub == "CREATE" {
                StreamCommand::GroupCreate { key, group, start, mkstream, entries_read: read }
            } else {
                StreamCommand::GroupSetId { key, group, start, entries_read: read }
            }
        }
        "DESTROY" => StreamCommand::GroupDestroy { key, group },
        "CREATECONSUMER" => StreamCommand::CreateConsumer { key, group, consumer: args[4].clone(), now_ms: 0 },
        _ => StreamCommand::DelConsumer { key, group, consumer: args[4].clone() },
    };
    Ok(Request::Write(cmd))
}

fn xpending(args: &[Vec<u8>]) -> Result<Request, Failure> {
    let (key, group) = (args[1].clone(), args[2].clone());
    if args.len() == 3 {
        return Ok(Request::PendingSummary { key, group });
    }
    let mut i = 3;
    let mut min_idle_ms = None;
    if upper(&args[i]) == "IDLE" {
        if args.len() < 8 {
            return Err(ERR_SYNTAX.into());
        }
        min_idle_ms = Some(integer(&args[i + 1])?.max(0) as u64);
        i += 2;
    }
    if args.len() < i + 3 {
        return Err(ERR_SYNTAX.into());
    }
    let from = bound(&args[i], true)?;
    let to = bound(&args[i + 1], false)?;
    let count = integer(&args[i + 2])?.max(0) as u64;
    let consumer = args.get(i + 3).cloned();
    Ok(Request::PendingRange { key, group, min_idle_ms, from, to, count, consumer })
}

fn min_idle(b: &[u8], cmd: &str) -> Result<u64, Failure> {
    parse_i64(b).map(|n| n.max(0) as u64).ok_or_else(|| format!("ERR Invalid min-idle-time argument for {cmd}"))
}

fn xclaim(args: &[Vec<u8>], now_ms: u64) -> Result<Request, Failure> {
    let (key, group, consumer) = (args[1].clone(), args[2].clone(), args[3].clone());
    let min_idle_ms = min_idle(&args[4], "XCLAIM")?;
    let mut i = 5;
    let mut claim_ids = Vec::new();
    while i < args.len() {
        match strict_id(&args[i]) {
            Ok(id) => claim_ids.push(id),
            Err(_) => break,
        }
        i += 1;
    }
    let mut o = ClaimOptions::default();
    while i < args.len() {
        let opt = upper(&args[i]);
        let more = i + 1 < args.len();
        let value = |what: &str| {
            parse_i64(&args[i + 1]).ok_or_else(|| format!("ERR Invalid {what} option argument for XCLAIM"))
        };
        match opt.as_str() {
            "FORCE" => o.force = true,
            "JUSTID" => o.just_id = true,
            "IDLE" if more => {
                o.delivery_time_ms = Some(now_ms.saturating_sub(value("IDLE")?.max(0) as u64));
                i += 1;
            }
            "TIME" if more => {
                o.delivery_time_ms = Some(value("TIME")?.max(0) as u64);
                i += 1;
            }
            "RETRYCOUNT" if more => {
                o.retry_count = Some(value("RETRYCOUNT")?.max(0) as u64);
                i += 1;
            }
            "LASTID" if more => {
                o.last_id = Some(strict_id(&args[i + 1])?);
                i += 1;
            }
            _ => {
                return Err(format!("ERR Unrecognized XCLAIM option '{}'", String::from_utf8_lossy(&args[i])));
            }
        }
        i += 1;
    }
    Ok(Request::Write(StreamCommand::Claim { key, group, consumer, min_idle_ms, ids: claim_ids, options: o, now_ms }))
}

fn xautoclaim(args: &[Vec<u8>]) -> Result<Request, Failure> {
    let (key, group, consumer) = (args[1].clone(), args[2].clone(), args[3].clone());
    let min_idle_ms = min_idle(&args[4], "XAUTOCLAIM")?;
    let start = bound(&args[5], true)?;
    let mut count = 100;
    let mut just_id = false;
    let mut i = 6;
    while i < args.len() {
        match upper(&args[i]).as_str() {
            "COUNT" if i + 1 < args.len() => {
                let n =
                    parse_i64(&args[i + 1]).filter(|n| *n > 0).ok_or_else(|| "ERR COUNT must be > 0".to_string())?;
                count = n as u64;
                i += 2;
            }
            "JUSTID" => {
                just_id = true;
                i += 1;
            }
            _ => return Err(ERR_SYNTAX.into()),
        }
    }
    Ok(Request::Write(StreamCommand::AutoClaim { key, group, consumer, min_idle_ms, start, count, just_id, now_ms: 0 }))
}

fn xinfo(args: &[Vec<u8>]) -> Result<Request, Failure> {
    let sub = upper(&args[1]);
    if sub == "HELP" && args.len() == 2 {
        return Ok(Request::Help(XINFO_HELP));
    }
    let typed = String::from_utf8_lossy(&args[1]).into_owned();
    let need = match sub.as_str() {
        "STREAM" => 3,
        "GROUPS" => 3,
        "CONSUMERS" => 4,
        _ => return Err(format!("ERR unknown subcommand '{typed}'. Try XINFO HELP.")),
    };
    if args.len() < need {
        return Err(wrong_args(&format!("xinfo|{}", sub.to_ascii_lowercase())));
    }
    let bad_options = || format!("ERR unknown subcommand or wrong number of arguments for '{typed}'. Try XINFO HELP.");
    if sub == "STREAM" && args.len() > need {
        // FULL [COUNT n]; COUNT defaults to 10.
        return match &args[3..] {
            [full] if upper(full) == "FULL" => Ok(Request::InfoStreamFull { key: args[2].clone(), count: 10 }),
            [full, c, n] if upper(full) == "FULL" && upper(c) == "COUNT" => {
                Ok(Request::InfoStreamFull { key: args[2].clone(), count: integer(n)?.max(0) as u64 })
            }
            _ => Err(bad_options()),
        };
    }
    if args.len() > need {
        return Err(bad_options());
    }
    Ok(match sub.as_str() {
        "STREAM" => Request::InfoStream(args[2].clone()),
        "GROUPS" => Request::InfoGroups(args[2].clone()),
        _ => Request::InfoConsumers { key: args[2].clone(), group: args[3].clone() },
    })
}

/// Parses one command (`args[0]` is its name); `now_ms` is the gateway's clock,
/// for options given relative to it.
pub fn parse(args: &[Vec<u8>], now_ms: u64) -> Result<Request, Failure> {
    let name = upper(&args[0]);
    // Arity as in Redis's command table: exact, or a minimum (negative there).
    let (min, exact) = match name.as_str() {
        "XADD" => (5, false),
        "XLEN" => (2, true),
        "XRANGE" | "XREVRANGE" => (4, false),
        "XREAD" => (4, false),
        "XREADGROUP" => (7, false),
        "XDEL" => (3, false),
        "XTRIM" => (4, false),
        "DEL" => (2, false),
        "XACK" => (4, false),
        "XPENDING" => (3, false),
        "XCLAIM" => (6, false),
        "XAUTOCLAIM" => (6, false),
        "XGROUP" | "XINFO" => (2, false),
        "EXISTS" => (2, false),
        "TYPE" => (2, true),
        _ => {
            let mut shown = String::new();
            for a in &args[1..] {
                if shown.len() >= 128 {
                    break;
                }
                shown.push_str(&format!("'{}' ", String::from_utf8_lossy(a)));
            }
            // At most 128 bytes, cut on a character boundary (names are shown
            // lossily as UTF-8).
            let mut cut = shown.len().min(128);
            while !shown.is_char_boundary(cut) {
                cut -= 1;
            }
            shown.truncate(cut);
            return Err(format!(
                "ERR unknown command '{}', with args beginning with: {shown}",
                String::from_utf8_lossy(&args[0])
            ));
        }
    };
    if args.len() < min || (exact && args.len() != min) {
        return Err(wrong_args(&name.to_ascii_lowercase()));
    }
    match name.as_str() {
        "XADD" => xadd(args),
        "XLEN" => Ok(Request::Len(args[1].clone())),
        "XRANGE" => range(args, false),
        "XREVRANGE" => range(args, true),
        "XREAD" => xread(args),
        "XREADGROUP" => xreadgroup(args),
        "XDEL" => Ok(Request::Write(StreamCommand::DelEntries { key: args[1].clone(), ids: ids(&args[2..])? })),
        "XTRIM" => {
            let (trim, _, _) = trim_options(args, 2, false)?;
            let trim = trim.ok_or_else(|| ERR_SYNTAX.to_string())?;
            Ok(Request::Write(StreamCommand::Trim { key: args[1].clone(), trim }))
        }
        "DEL" => Ok(Request::Del(args[1..].to_vec())),
        "EXISTS" => Ok(Request::Exists(args[1..].to_vec())),
        "TYPE" => Ok(Request::Type(args[1].clone())),
        "XACK" => Ok(Request::Write(StreamCommand::Ack {
            key: args[1].clone(),
            group: args[2].clone(),
            ids: ids(&args[3..])?,
        })),
        "XPENDING" => xpending(args),
        "XCLAIM" => xclaim(args, now_ms),
        "XAUTOCLAIM" => xautoclaim(args),
        "XGROUP" => xgroup(args),
        _ => xinfo(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Vec<u8>> {
        s.split(' ').map(|a| a.as_bytes().to_vec()).collect()
    }

    #[test]
    fn ids_and_bounds_parse_as_redis_does() {
        assert_eq!(strict_id(b"01-01"), Ok(StreamId::new(1, 1)));
        assert_eq!(strict_id(b"5"), Ok(StreamId::new(5, 0)));
        for bad in ["abc", "6-x", "-1", "6-0-0", "2-", "+", "-", "18446744073709551616-0"] {
            assert_eq!(strict_id(bad.as_bytes()), Err(ERR_INVALID_ID.to_string()), "{bad}");
        }
        assert_eq!(bound(b"(1", true), Ok(StreamId::new(1, 1)));
        assert_eq!(bound(b"5", false), Ok(StreamId::new(5, u64::MAX)));
        assert_eq!(bound(b"(5", false), Ok(StreamId::new(5, u64::MAX - 1)));
        assert_eq!(bound(b"(0-0", false), Err("ERR invalid end ID for the interval".to_string()));
        assert_eq!(bound(b"(-", true), Err(ERR_INVALID_ID.to_string()));
    }

    #[test]
    fn xadd_options_and_errors() {
        let Ok(Request::Write(StreamCommand::Add { trim: Some(t), no_mkstream: true, id: IdSpec::AutoSeq(7), .. })) =
            parse(&args("XADD s NOMKSTREAM maxlen ~ 10 LIMIT 5 7-* f v"), 0)
        else {
            panic!("not parsed");
        };
        assert_eq!(t, Trim { strategy: TrimStrategy::MaxLen(10), approx: true, limit: Some(5) });
        let err = |s: &str| parse(&args(s), 0).expect_err(s);
        assert_eq!(err("XADD s * f"), "ERR wrong number of arguments for 'xadd' command");
        assert_eq!(err("XADD s MAXLEN -1 * f v"), "ERR The MAXLEN argument must be >= 0.");
        assert_eq!(
            err("XADD s MAXLEN 5 LIMIT 2 * f v"),
            "ERR syntax error, LIMIT cannot be used without the special ~ option"
        );
        assert_eq!(
            err("XADD s MAXLEN 5 MINID 1 * f v"),
            "ERR syntax error, MAXLEN and MINID options at the same time are not compatible"
        );
        assert_eq!(err("XFOO s 1"), "ERR unknown command 'XFOO', with args beginning with: 's' '1' ");
        assert_eq!(err("XGROUP FOO s g"), "ERR unknown subcommand 'FOO'. Try XGROUP HELP.");
        assert_eq!(err("XGROUP create s g"), "ERR wrong number of arguments for 'xgroup|create' command");
        assert_eq!(err("XREAD STREAMS a b c"), ERR_UNBALANCED);
        assert_eq!(err("XREAD BLOCK -1 STREAMS a 0"), "ERR timeout is negative");
        assert_eq!(err("XCLAIM s g c 0 abc"), "ERR Unrecognized XCLAIM option 'abc'");
        assert_eq!(err("XAUTOCLAIM s g c 0 0 COUNT 0"), "ERR COUNT must be > 0");
        // Found by fuzzing: the shown arguments are cut on a character boundary.
        let long = format!("XFOO {}", "é".repeat(100));
        assert!(err(&long).starts_with("ERR unknown command 'XFOO', with args beginning with: 'éé"));
    }
}
