//! The RESP wire format: encoding replies (RESP2 and RESP3) and decoding commands
//! (multibulk and inline), with Redis 7's limits and protocol-error messages.
//!
//! Decoding contract ([`parse_command`], [`CommandParser::parse`]):
//! - One call consumes at most one command from the front of the buffer. When the
//!   buffer does not yet hold a complete command, the call returns `Ok(None)` and
//!   consumes nothing, so the caller appends what it reads next and calls again.
//! - `*0\r\n`, `*-1\r\n` (any count ≤ 0) and an empty or all-blank inline line are
//!   consumed and yield an empty argument vector; a server skips it, as Redis does.
//! - On `Err(ProtocolError)` the connection is beyond repair: the caller sends
//!   `-ERR <message>` and closes. The buffer's contents are then unspecified.
//! - Memory is bounded by [`Limits`]: a count, a bulk length or an inline line over
//!   its limit is an error as soon as its header (or the limit's worth of bytes) has
//!   arrived, not after buffering the payload. The caller still bounds the whole
//!   query buffer (many elements each under the limit add up); `server` does.
//!
//! Decoding follows Redis 7.0's `processMultibulkBuffer` / `processInlineBuffer`
//! (checked against redis-server 7.0.15), including where Redis is lenient: the two
//! bytes after a header's `\r` and after a bulk payload are skipped without checking
//! that they are `\n` / `\r\n`. One deliberate difference: Redis accepts an inline
//! line longer than 64 KiB when it happens to arrive in one read; here a line longer
//! than [`Limits::max_inline_bytes`] is always an error, whatever the read sizes.

use std::ops::Range;

use bytes::{Buf, BytesMut};

/// Default [`Limits::max_bulk_bytes`]: 8 MiB. Redis's `proto-max-bulk-len` default is
/// 512 MiB; a stream entry field has no business being that large, and 8 MiB keeps
/// the worst case per argument small.
pub const DEFAULT_MAX_BULK_BYTES: usize = 8 * 1024 * 1024;

/// Default [`Limits::max_multibulk_len`]: 1,048,576 arguments, the bound Redis itself
/// used up to 6.x. Redis 7 accepts counts up to `INT_MAX` (2,147,483,647), which no
/// command here needs; a count over the limit is refused before anything is stored.
pub const DEFAULT_MAX_MULTIBULK_LEN: usize = 1024 * 1024;

/// Default [`Limits::max_inline_bytes`]: 64 KiB, Redis's `PROTO_INLINE_MAX_SIZE`. It
/// also bounds the `*<count>` and `$<length>` header lines, as in Redis.
pub const DEFAULT_MAX_INLINE_BYTES: usize = 64 * 1024;

/// Most arguments Redis 7 accepts in one multibulk from a connection that must
/// authenticate and has not ([`AuthStage::Unauthenticated`]).
pub const UNAUTHENTICATED_MAX_MULTIBULK_LEN: usize = 10;

/// Largest bulk Redis 7 accepts from a connection that must authenticate and has not.
pub const UNAUTHENTICATED_MAX_BULK_BYTES: usize = 16 * 1024;

/// Longest number `string2ll` accepts (`LONG_STR_SIZE` - 1): "-9223372036854775808".
const MAX_INTEGER_DIGITS: usize = 20;

/// Capacity reserved up front for a multibulk's argument list. The count comes from
/// the client, so it is not trusted for allocation; the list grows as elements arrive.
const INITIAL_ARGS_CAPACITY: usize = 64;

const CRLF: &[u8] = b"\r\n";

/// The reply protocol a connection speaks; `HELLO 3` switches to RESP3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// RESP2, every connection's protocol until `HELLO 3`.
    #[default]
    Resp2,
    /// RESP3: nulls are `_`, maps are `%`.
    Resp3,
}

impl Protocol {
    /// The version number `HELLO` takes and reports (2 or 3).
    pub fn version(self) -> i64 {
        match self {
            Protocol::Resp2 => 2,
            Protocol::Resp3 => 3,
        }
    }
}

/// One reply, encoded for a connection's [`Protocol`] by [`Reply::encode`].
///
/// Serializable (serde) so that a member can run a command for another member's
/// connection and send the reply back to be encoded there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reply {
    /// `+text`: a status such as `OK`. A `\r` or `\n` in it is sent as a space.
    Simple(String),
    /// `-text`: the full error text without the `-`, starting with its code, e.g.
    /// `ERR unknown command ...`, `WRONGTYPE ...`, `NOAUTH ...`. A `\r` or `\n` in it
    /// is sent as a space, as Redis does, so a message can never break the framing.
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$len` and the bytes.
    Bulk(Vec<u8>),
    /// A missing value: `$-1` in RESP2, `_` in RESP3.
    Nil,
    /// A missing array (e.g. `XREAD` timing out): `*-1` in RESP2, `_` in RESP3.
    NilArray,
    /// `*n` and the elements.
    Array(Vec<Reply>),
    /// Key-value pairs: `%n` in RESP3; in RESP2 a flat array of the 2n keys and
    /// values, as Redis sends maps to RESP2 clients.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    /// `+OK`.
    pub fn ok() -> Reply {
        Reply::Simple("OK".to_owned())
    }

    /// An error reply; `text` is the full text with its code, e.g.
    /// `Reply::error("ERR value is not an integer or out of range")`.
    pub fn error(text: impl Into<String>) -> Reply {
        Reply::Error(text.into())
    }

    /// A bulk string.
    pub fn bulk(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::Bulk(bytes.into())
    }

    /// Redis 7's arity error, e.g. `ERR wrong number of arguments for 'xadd' command`.
    /// Redis prints the command's table name, which is lower case whatever the client
    /// sent, so `command` is lower-cased; for a subcommand pass `"client|setname"`.
    pub fn wrong_args(command: impl AsRef<[u8]>) -> Reply {
        let name = String::from_utf8_lossy(command.as_ref()).to_ascii_lowercase();
        Reply::Error(format!("ERR wrong number of arguments for '{name}' command"))
    }

    /// `ERR syntax error`.
    pub fn syntax() -> Reply {
        Reply::error("ERR syntax error")
    }

    /// `NOAUTH Authentication required.`, Redis's reply to a command sent before
    /// authenticating.
    pub fn noauth() -> Reply {
        Reply::error("NOAUTH Authentication required.")
    }

    /// `WRONGPASS invalid username-password pair or user is disabled.`, Redis 7's
    /// reply to a failed `AUTH` or `HELLO ... AUTH`.
    pub fn wrong_pass() -> Reply {
        Reply::error("WRONGPASS invalid username-password pair or user is disabled.")
    }

    /// Redis 7.0's reply to an unknown command, e.g.
    /// `ERR unknown command 'FOO', with args beginning with: 'a' 'b' `: the name as
    /// sent (at most 128 bytes), then quoted arguments until 128 bytes of them have
    /// been shown. Like Redis's `%s`, each string stops at a NUL byte; bytes that are
    /// not UTF-8 are shown as U+FFFD.
    pub fn unknown_command(args: &[Vec<u8>]) -> Reply {
        const SHOWN_BYTES: usize = 128;
        let name = args.first().map(|name| until_nul(name)).unwrap_or_default();
        let name = &name[..name.len().min(SHOWN_BYTES)];
        let mut shown: Vec<u8> = Vec::new();
        for arg in args.iter().skip(1) {
            if shown.len() >= SHOWN_BYTES {
                break;
            }
            let arg = until_nul(arg);
            let room = SHOWN_BYTES - shown.len();
            shown.push(b'\'');
            shown.extend_from_slice(&arg[..arg.len().min(room)]);
            shown.extend_from_slice(b"' ");
        }
        Reply::Error(format!(
            "ERR unknown command '{}', with args beginning with: {}",
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(&shown)
        ))
    }

    /// Appends this reply's encoding for `protocol` to `out`.
    pub fn encode(&self, protocol: Protocol, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(text) => push_line(out, b'+', text.as_bytes()),
            Reply::Error(text) => push_line(out, b'-', text.as_bytes()),
            Reply::Integer(n) => {
                out.push(b':');
                push_signed(out, *n);
                out.extend_from_slice(CRLF);
            }
            Reply::Bulk(bytes) => {
                push_header(out, b'$', bytes.len());
                out.extend_from_slice(bytes);
                out.extend_from_slice(CRLF);
            }
            Reply::Nil => out.extend_from_slice(match protocol {
                Protocol::Resp2 => b"$-1\r\n",
                Protocol::Resp3 => b"_\r\n",
            }),
            Reply::NilArray => out.extend_from_slice(match protocol {
                Protocol::Resp2 => b"*-1\r\n",
                Protocol::Resp3 => b"_\r\n",
            }),
            Reply::Array(items) => {
                push_header(out, b'*', items.len());
                for item in items {
                    item.encode(protocol, out);
                }
            }
            Reply::Map(pairs) => {
                match protocol {
                    Protocol::Resp2 => push_header(out, b'*', pairs.len().saturating_mul(2)),
                    Protocol::Resp3 => push_header(out, b'%', pairs.len()),
                }
                for (key, value) in pairs {
                    key.encode(protocol, out);
                    value.encode(protocol, out);
                }
            }
        }
    }
}

/// The bytes of `s` up to its first NUL, as C's `%s` would print them.
fn until_nul(s: &[u8]) -> &[u8] {
    match s.iter().position(|&b| b == 0) {
        Some(end) => &s[..end],
        None => s,
    }
}

/// `<prefix><text>\r\n` with any `\r` or `\n` in `text` replaced by a space: a line
/// type cannot carry them, and Redis's `addReplyErrorFormat` does the same.
fn push_line(out: &mut Vec<u8>, prefix: u8, text: &[u8]) {
    out.push(prefix);
    out.extend(text.iter().map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(CRLF);
}

fn push_header(out: &mut Vec<u8>, prefix: u8, len: usize) {
    out.push(prefix);
    push_unsigned(out, len as u64);
    out.extend_from_slice(CRLF);
}

fn push_signed(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    push_unsigned(out, n.unsigned_abs());
}

/// Decimal digits without the allocation `to_string` would make per reply.
fn push_unsigned(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; MAX_INTEGER_DIGITS];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Redis's `string2ll`: an optional `-`, then `0` alone or digits without a leading
/// zero, no sign `+`, no spaces, no overflow, at most 20 characters. Commands that
/// take integers (`SELECT`, `HELLO`) read them with the same rules.
pub fn parse_integer(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > MAX_INTEGER_DIGITS {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut magnitude: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        magnitude = magnitude.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        // -(i64::MIN) does not fit in i64, so the magnitude is checked against it first.
        if magnitude > i64::MIN.unsigned_abs() {
            None
        } else {
            Some(0i64.wrapping_sub_unsigned(magnitude))
        }
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Bounds on one command, checked as it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk argument (`$<len>`) accepted; larger is
    /// `Protocol error: invalid bulk length`. Default [`DEFAULT_MAX_BULK_BYTES`].
    pub max_bulk_bytes: usize,
    /// Most arguments in one multibulk (`*<count>`); more is
    /// `Protocol error: invalid multibulk length`. Default [`DEFAULT_MAX_MULTIBULK_LEN`].
    pub max_multibulk_len: usize,
    /// Longest inline command line, and longest `*<count>` / `$<len>` header line,
    /// in bytes without the line ending. Default [`DEFAULT_MAX_INLINE_BYTES`].
    pub max_inline_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_bytes: DEFAULT_MAX_BULK_BYTES,
            max_multibulk_len: DEFAULT_MAX_MULTIBULK_LEN,
            max_inline_bytes: DEFAULT_MAX_INLINE_BYTES,
        }
    }
}

/// A malformed request. The string is exactly what Redis 7 sends (after `-ERR `)
/// before closing the connection, e.g. `Protocol error: invalid bulk length`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

impl ProtocolError {
    fn new(message: &str) -> Self {
        ProtocolError(message.to_owned())
    }
    fn invalid_multibulk_length() -> Self {
        Self::new("Protocol error: invalid multibulk length")
    }
    fn invalid_bulk_length() -> Self {
        Self::new("Protocol error: invalid bulk length")
    }
}

/// Whether the connection has passed authentication, which decides the limits: a
/// connection that must authenticate and has not gets Redis 7's tighter ones
/// ([`UNAUTHENTICATED_MAX_MULTIBULK_LEN`], [`UNAUTHENTICATED_MAX_BULK_BYTES`]), so
/// that an anonymous peer cannot make the server buffer large requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStage {
    /// Authenticated, or no authentication required: only [`Limits`] apply.
    Authenticated,
    /// Authentication required and not done yet.
    Unauthenticated,
}

/// Consumes one complete command from the front of `buf`, if there is one, under
/// `limits` (see the module docs for the contract). Each call starts from scratch;
/// a connection should keep a [`CommandParser`], which resumes where it stopped.
pub fn parse_command(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
    CommandParser::new(*limits).parse(buf, AuthStage::Authenticated)
}

/// A command decoder for one connection. It behaves like [`parse_command`] but
/// remembers how far it got in an incomplete command, so a large command arriving
/// in many reads is scanned once rather than once per read.
///
/// Between calls that return `Ok(None)` the caller must only append to the buffer;
/// after `Ok(Some(_))` it may do anything, since the progress is then cleared. If the
/// buffer is replaced anyway, call [`CommandParser::reset`].
#[derive(Debug, Clone)]
pub struct CommandParser {
    limits: Limits,
    progress: Progress,
}

/// How far into the buffer the command being decoded has been read. All offsets
/// are from the front of the buffer, which nothing consumes until the command is
/// complete.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// The multibulk's argument count, once its header has been read.
    count: Option<usize>,
    /// Start of the next unread element (its `$` header, or its payload when
    /// `bulk_len` is set).
    pos: usize,
    /// Length of the element whose header has been read but whose payload has not.
    bulk_len: Option<usize>,
    /// Payload positions of the elements read so far.
    args: Vec<Range<usize>>,
    /// Bytes already searched, without success, for the current line's end.
    scanned: usize,
}

/// Where a line ends, searching from a start offset.
enum LineEnd {
    /// No line ending in the buffer yet.
    Missing,
    /// The `\r` is the last byte, so the byte after it has not arrived.
    Partial,
    /// The line's `\r` is at this offset and the byte after it is in the buffer.
    At(usize),
}

impl CommandParser {
    /// A parser enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        CommandParser { limits, progress: Progress::default() }
    }

    /// The limits this parser enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Forgets any partly decoded command.
    pub fn reset(&mut self) {
        self.progress = Progress::default();
    }

    /// Consumes one complete command from the front of `buf` if there is one, as
    /// [`parse_command`] does, with the limits of `stage` as well as [`Limits`].
    pub fn parse(&mut self, buf: &mut BytesMut, stage: AuthStage) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        if self.progress.pos > buf.len() || self.progress.scanned > buf.len() {
            // The buffer shrank under us (a broken caller): start over rather than
            // trust offsets into bytes that are gone.
            self.reset();
        }
        let result = match buf.first() {
            None => return Ok(None),
            Some(b'*') => self.parse_multibulk(buf, stage),
            Some(_) => self.parse_inline(buf),
        };
        if !matches!(result, Ok(None)) {
            self.reset();
        }
        result
    }

    /// `processInlineBuffer`: one line, split with Redis's quoting rules.
    fn parse_inline(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        let too_big = || ProtocolError::new("Protocol error: too big inline request");
        let from = self.progress.scanned;
        let Some(newline) = buf.get(from..).and_then(|rest| rest.iter().position(|&b| b == b'\n')).map(|i| from + i)
        else {
            self.progress.scanned = buf.len();
            // A trailing '\r' may be the start of the line ending, not content.
            let content = if buf.ends_with(b"\r") { buf.len() - 1 } else { buf.len() };
            return if content > self.limits.max_inline_bytes { Err(too_big()) } else { Ok(None) };
        };
        let end = if newline > 0 && buf.get(newline - 1) == Some(&b'\r') { newline - 1 } else { newline };
        if end > self.limits.max_inline_bytes {
            return Err(too_big());
        }
        let args = split_inline_args(&buf[..end])
            .ok_or_else(|| ProtocolError::new("Protocol error: unbalanced quotes in request"))?;
        buf.advance(newline + 1);
        Ok(Some(args))
    }

    /// `processMultibulkBuffer`: `*<count>\r\n` then `count` times `$<len>\r\n<bytes>\r\n`.
    fn parse_multibulk(&mut self, buf: &mut BytesMut, stage: AuthStage) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        let limits = self.limits;
        let unauthenticated = stage == AuthStage::Unauthenticated;
        let progress = &mut self.progress;

        let count = match progress.count {
            Some(count) => count,
            None => {
                let cr = match find_line_end(buf, 0, &mut progress.scanned) {
                    LineEnd::At(cr) => cr,
                    LineEnd::Partial => return Ok(None),
                    LineEnd::Missing if buf.len() > limits.max_inline_bytes => {
                        return Err(ProtocolError::new("Protocol error: too big mbulk count string"));
                    }
                    LineEnd::Missing => return Ok(None),
                };
                let count = parse_integer(&buf[1..cr]).ok_or_else(ProtocolError::invalid_multibulk_length)?;
                if count > 0 && count as u64 > limits.max_multibulk_len as u64 {
                    return Err(ProtocolError::invalid_multibulk_length());
                }
                if unauthenticated && count > UNAUTHENTICATED_MAX_MULTIBULK_LEN as i64 {
                    return Err(ProtocolError::new("Protocol error: unauthenticated multibulk length"));
                }
                // The byte after '\r' is skipped unchecked, as Redis does.
                progress.pos = cr + 2;
                let Ok(count @ 1..) = usize::try_from(count) else {
                    // `*0` and negative counts are empty commands, skipped by the server.
                    buf.advance(progress.pos);
                    return Ok(Some(Vec::new()));
                };
                progress.count = Some(count);
                progress.args = Vec::with_capacity(count.min(INITIAL_ARGS_CAPACITY));
                count
            }
        };

        while progress.args.len() < count {
            let len = match progress.bulk_len {
                Some(len) => len,
                None => {
                    let start = progress.pos;
                    let cr = match find_line_end(buf, start, &mut progress.scanned) {
                        LineEnd::At(cr) => cr,
                        LineEnd::Partial => return Ok(None),
                        LineEnd::Missing if buf.len() - start > limits.max_inline_bytes => {
                            return Err(ProtocolError::new("Protocol error: too big bulk count string"));
                        }
                        LineEnd::Missing => return Ok(None),
                    };
                    let marker = buf[start];
                    if marker != b'$' {
                        return Err(ProtocolError(format!(
                            "Protocol error: expected '$', got '{}'",
                            char::from(marker)
                        )));
                    }
                    let len = parse_integer(&buf[start + 1..cr])
                        .and_then(|len| usize::try_from(len).ok())
                        .filter(|&len| len <= limits.max_bulk_bytes)
                        .ok_or_else(ProtocolError::invalid_bulk_length)?;
                    if unauthenticated && len > UNAUTHENTICATED_MAX_BULK_BYTES {
                        return Err(ProtocolError::new("Protocol error: unauthenticated bulk length"));
                    }
                    progress.pos = cr + 2;
                    progress.bulk_len = Some(len);
                    len
                }
            };
            // The payload and the two bytes after it (meant to be "\r\n", skipped
            // unchecked as Redis does).
            if buf.len() - progress.pos < len.saturating_add(2) {
                return Ok(None);
            }
            progress.args.push(progress.pos..progress.pos + len);
            progress.pos += len + 2;
            progress.bulk_len = None;
        }

        let args = progress.args.iter().map(|range| buf[range.clone()].to_vec()).collect();
        buf.advance(progress.pos);
        Ok(Some(args))
    }
}

/// Finds the `\r` ending the line that starts at `start`, searching only bytes not
/// searched before (`scanned`), as Redis finds it with `strchr(…, '\r')`.
fn find_line_end(buf: &[u8], start: usize, scanned: &mut usize) -> LineEnd {
    let from = start.max(*scanned);
    let found = buf.get(from..).and_then(|rest| rest.iter().position(|&b| b == b'\r')).map(|i| from + i);
    match found {
        None => {
            *scanned = buf.len();
            LineEnd::Missing
        }
        Some(cr) if cr + 1 >= buf.len() => {
            *scanned = cr;
            LineEnd::Partial
        }
        Some(cr) => {
            *scanned = cr + 2;
            LineEnd::At(cr)
        }
    }
}

/// C's `isspace`, which Redis uses to separate inline arguments.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    None,
    Double,
    Single,
}

/// Splits an inline command line the way Redis's `sdssplitargs` does:
/// - arguments are separated by blanks (C `isspace`);
/// - `"..."` takes the escapes `\n \r \t \b \a`, `\xHH` (two hex digits) and `\<c>`
///   for any other `c` (so `\\` and `\"`);
/// - `'...'` takes only `\'`;
/// - a quote may start mid-argument (`ab"c d"` is `abc d`), but a closing quote must
///   be followed by a blank or the end of the line;
/// - the line ends at a NUL byte, as it does for Redis's C strings.
///
/// Returns `None` for an unterminated quote or a closing quote followed by
/// something else (Redis's "unbalanced quotes").
fn split_inline_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = until_nul(line);
    let at = |i: usize| line.get(i).copied();
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while at(i).is_some_and(is_c_space) {
            i += 1;
        }
        if at(i).is_none() {
            return Some(args);
        }
        let mut arg = Vec::new();
        let mut quoting = Quoting::None;
        loop {
            match quoting {
                Quoting::Double => match at(i)? {
                    b'\\' => match (at(i + 1), at(i + 2).and_then(hex_value), at(i + 3).and_then(hex_value)) {
                        (Some(b'x'), Some(high), Some(low)) => {
                            arg.push(high << 4 | low);
                            i += 4;
                        }
                        (Some(escaped), _, _) => {
                            arg.push(match escaped {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => b'\x08',
                                b'a' => b'\x07',
                                other => other,
                            });
                            i += 2;
                        }
                        // A backslash ending the line: kept, and the quote is then
                        // unterminated.
                        (None, _, _) => {
                            arg.push(b'\\');
                            i += 1;
                        }
                    },
                    b'"' => {
                        if at(i + 1).is_some_and(|next| !is_c_space(next)) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    other => {
                        arg.push(other);
                        i += 1;
                    }
                },
                Quoting::Single => match at(i)? {
                    b'\\' if at(i + 1) == Some(b'\'') => {
                        arg.push(b'\'');
                        i += 2;
                    }
                    b'\'' => {
                        if at(i + 1).is_some_and(|next| !is_c_space(next)) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    other => {
                        arg.push(other);
                        i += 1;
                    }
                },
                Quoting::None => match at(i) {
                    None => break,
                    // Only these end an unquoted argument; '\v' and '\f' are kept,
                    // as in Redis (they only separate arguments when skipped above).
                    Some(b' ' | b'\n' | b'\r' | b'\t') => {
                        i += 1;
                        break;
                    }
                    Some(b'"') => {
                        quoting = Quoting::Double;
                        i += 1;
                    }
                    Some(b'\'') => {
                        quoting = Quoting::Single;
                        i += 1;
                    }
                    Some(other) => {
                        arg.push(other);
                        i += 1;
                    }
                },
            }
        }
        args.push(arg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(reply: &Reply, protocol: Protocol) -> Vec<u8> {
        let mut out = Vec::new();
        reply.encode(protocol, &mut out);
        out
    }

    fn both(reply: &Reply) -> (String, String) {
        (
            String::from_utf8_lossy(&encoded(reply, Protocol::Resp2)).into_owned(),
            String::from_utf8_lossy(&encoded(reply, Protocol::Resp3)).into_owned(),
        )
    }

    fn command(args: &[&[u8]]) -> Vec<u8> {
        encoded(&Reply::Array(args.iter().map(|a| Reply::bulk(*a)).collect()), Protocol::Resp2)
    }

    fn owned(args: &[&[u8]]) -> Vec<Vec<u8>> {
        args.iter().map(|a| a.to_vec()).collect()
    }

    /// Parses every command in `input` (which must end on a command boundary).
    fn parse_all(input: &[u8], limits: &Limits) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        let mut commands = Vec::new();
        while let Some(args) = parse_command(&mut buf, limits)? {
            commands.push(args);
        }
        assert!(buf.is_empty(), "left over: {:?}", String::from_utf8_lossy(&buf));
        Ok(commands)
    }

    fn parse_one(input: &[u8]) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        parse_command(&mut BytesMut::from(input), &Limits::default())
    }

    fn error_of(input: &[u8], limits: &Limits, stage: AuthStage) -> String {
        let mut buf = BytesMut::from(input);
        let mut parser = CommandParser::new(*limits);
        loop {
            match parser.parse(&mut buf, stage) {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("no error for {:?}", String::from_utf8_lossy(input)),
                Err(e) => return e.0,
            }
        }
    }

    fn default_error(input: &[u8]) -> String {
        error_of(input, &Limits::default(), AuthStage::Authenticated)
    }

    #[test]
    fn encodes_scalars() {
        assert_eq!(both(&Reply::ok()), ("+OK\r\n".into(), "+OK\r\n".into()));
        assert_eq!(both(&Reply::Integer(0)).0, ":0\r\n");
        assert_eq!(both(&Reply::Integer(-42)).0, ":-42\r\n");
        assert_eq!(both(&Reply::Integer(i64::MIN)).0, ":-9223372036854775808\r\n");
        assert_eq!(both(&Reply::Integer(i64::MAX)).1, ":9223372036854775807\r\n");
        assert_eq!(both(&Reply::bulk("hi")).0, "$2\r\nhi\r\n");
        assert_eq!(both(&Reply::bulk("")).1, "$0\r\n\r\n");
        assert_eq!(encoded(&Reply::bulk(&b"a\r\nb\0"[..]), Protocol::Resp2), b"$5\r\na\r\nb\0\r\n");
        assert_eq!(both(&Reply::syntax()).0, "-ERR syntax error\r\n");
    }

    #[test]
    fn encodes_nil_nil_array_and_map_per_protocol() {
        assert_eq!(both(&Reply::Nil), ("$-1\r\n".into(), "_\r\n".into()));
        assert_eq!(both(&Reply::NilArray), ("*-1\r\n".into(), "_\r\n".into()));
        let map = Reply::Map(vec![
            (Reply::bulk("proto"), Reply::Integer(3)),
            (Reply::bulk("modules"), Reply::Array(vec![])),
            (Reply::bulk("name"), Reply::Nil),
        ]);
        assert_eq!(
            both(&map),
            (
                "*6\r\n$5\r\nproto\r\n:3\r\n$7\r\nmodules\r\n*0\r\n$4\r\nname\r\n$-1\r\n".into(),
                "%3\r\n$5\r\nproto\r\n:3\r\n$7\r\nmodules\r\n*0\r\n$4\r\nname\r\n_\r\n".into(),
            )
        );
        assert_eq!(both(&Reply::Map(vec![])), ("*0\r\n".into(), "%0\r\n".into()));
        let nested = Reply::Array(vec![Reply::Map(vec![(Reply::bulk("k"), Reply::NilArray)]), Reply::Nil]);
        assert_eq!(
            both(&nested),
            ("*2\r\n*2\r\n$1\r\nk\r\n*-1\r\n$-1\r\n".into(), "*2\r\n%1\r\n$1\r\nk\r\n_\r\n_\r\n".into())
        );
    }

    #[test]
    fn sanitises_line_replies() {
        // What Redis 7 sends for `HELLO 3 "a\r\nb"`: each of \r and \n becomes a space.
        let reply = Reply::error("ERR Syntax error in HELLO option 'a\r\nb'");
        assert_eq!(both(&reply).0, "-ERR Syntax error in HELLO option 'a  b'\r\n");
        assert_eq!(both(&Reply::Simple("x\ny".into())).1, "+x y\r\n");
    }

    #[test]
    fn builds_redis_error_texts() {
        assert_eq!(Reply::wrong_args("XADD"), Reply::error("ERR wrong number of arguments for 'xadd' command"));
        assert_eq!(
            Reply::wrong_args(b"client|SETNAME"),
            Reply::error("ERR wrong number of arguments for 'client|setname' command")
        );
        assert_eq!(
            Reply::unknown_command(&owned(&[b"FOO", b"bar"])),
            Reply::error("ERR unknown command 'FOO', with args beginning with: 'bar' ")
        );
        assert_eq!(
            Reply::unknown_command(&owned(&[b"FOO"])),
            Reply::error("ERR unknown command 'FOO', with args beginning with: ")
        );
        // Arguments are shown until 128 bytes of them have been printed.
        let long = vec![b'a'; 200];
        let Reply::Error(text) = Reply::unknown_command(&[b"x".to_vec(), long.clone(), long]) else { panic!() };
        assert_eq!(text, format!("ERR unknown command 'x', with args beginning with: '{}' ", "a".repeat(128)));
    }

    #[test]
    fn round_trips_commands() {
        let cases: Vec<Vec<Vec<u8>>> = vec![
            owned(&[b"PING"]),
            owned(&[b"SET", b"key", b"value"]),
            owned(&[b"XADD", b"s", b"*", b"f", b""]),
            owned(&[b"SET", b"bin\r\n\0\xff", b"*3\r\n$1\r\n"]),
            vec![vec![b'x'; 100_000]],
        ];
        for args in cases {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let wire = command(&refs);
            assert_eq!(parse_all(&wire, &Limits::default()).unwrap(), vec![args.clone()]);
        }
    }

    #[test]
    fn parses_pipelined_commands_in_one_buffer() {
        let mut wire = command(&[b"PING"]);
        wire.extend_from_slice(b"PING\r\n");
        wire.extend_from_slice(b"*0\r\n");
        wire.extend(command(&[b"ECHO", b"a b"]));
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(b"set a \"b c\"\n");
        wire.extend_from_slice(b"*-1\r\n");
        let got = parse_all(&wire, &Limits::default()).unwrap();
        assert_eq!(
            got,
            vec![
                owned(&[b"PING"]),
                owned(&[b"PING"]),
                vec![],
                owned(&[b"ECHO", b"a b"]),
                vec![],
                owned(&[b"set", b"a", b"b c"]),
                vec![],
            ]
        );
    }

    #[test]
    fn incomplete_input_consumes_nothing_at_every_split_point() {
        let mut wire = command(&[b"XADD", b"stream", b"*", b"field", b"value\r\nwith crlf"]);
        wire.extend_from_slice(b"ECHO \"quoted \\x41\"\r\n");
        wire.extend(command(&[b"PING"]));
        let expected = parse_all(&wire, &Limits::default()).unwrap();
        assert_eq!(expected.len(), 3);
        for split in 0..=wire.len() {
            // A fresh parse of each prefix.
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            loop {
                let before = buf.len();
                match parse_command(&mut buf, &Limits::default()).unwrap() {
                    Some(args) => got.push(args),
                    None => {
                        assert_eq!(buf.len(), before, "Ok(None) consumed input at split {split}");
                        break;
                    }
                }
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(args) = parse_command(&mut buf, &Limits::default()).unwrap() {
                got.push(args);
            }
            assert_eq!(got, expected, "split at {split}");
            assert!(buf.is_empty());
        }
        // A resuming parser fed one byte at a time.
        let mut parser = CommandParser::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in &wire {
            buf.extend_from_slice(&[byte]);
            while let Some(args) = parser.parse(&mut buf, AuthStage::Authenticated).unwrap() {
                got.push(args);
            }
        }
        assert_eq!(got, expected);
        assert!(buf.is_empty());
    }

    #[test]
    fn reports_redis_protocol_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"*abc\r\n", "Protocol error: invalid multibulk length"),
            (b"*\r\n", "Protocol error: invalid multibulk length"),
            (b"*01\r\n", "Protocol error: invalid multibulk length"),
            (b"*-0\r\n", "Protocol error: invalid multibulk length"),
            (b"*+1\r\n", "Protocol error: invalid multibulk length"),
            (b"*1048577\r\n", "Protocol error: invalid multibulk length"),
            (b"*3000000000\r\n", "Protocol error: invalid multibulk length"),
            (b"*1\r\n$-1\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$abc\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$04\r\nPING\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$+4\r\nPING\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$8388609\r\n", "Protocol error: invalid bulk length"),
            (b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n", "Protocol error: expected '$', got 'f'"),
            (b"SET a \"b c\r\n", "Protocol error: unbalanced quotes in request"),
            (b"SET a 'b\r\n", "Protocol error: unbalanced quotes in request"),
            (b"ECHO \"a\"b\r\n", "Protocol error: unbalanced quotes in request"),
            (b"ECHO 'a'b\r\n", "Protocol error: unbalanced quotes in request"),
            (b"ECHO ab\"c d\"e\r\n", "Protocol error: unbalanced quotes in request"),
        ];
        for (input, message) in cases {
            assert_eq!(default_error(input), *message, "for {:?}", String::from_utf8_lossy(input));
        }
        // The full 8 MiB bulk is fine; a byte more is not.
        assert_eq!(parse_one(b"*1\r\n$8388608\r\n").unwrap(), None);
    }

    #[test]
    fn bounds_lines_without_an_ending() {
        let limits = Limits::default();
        let mut inline = b"PING".to_vec();
        inline.resize(limits.max_inline_bytes, b'x');
        assert_eq!(parse_one(&inline).unwrap(), None);
        inline.push(b'\r');
        assert_eq!(parse_one(&inline).unwrap(), None, "a trailing \\r may be the line ending");
        inline.pop();
        inline.push(b'x');
        assert_eq!(default_error(&inline), "Protocol error: too big inline request");
        // A complete line over the limit is refused as well.
        inline.extend_from_slice(b"\r\n");
        assert_eq!(default_error(&inline), "Protocol error: too big inline request");

        let mut count = b"*".to_vec();
        count.resize(limits.max_inline_bytes + 1, b'1');
        assert_eq!(default_error(&count), "Protocol error: too big mbulk count string");
        let mut bulk = b"*1\r\n$".to_vec();
        bulk.resize(4 + limits.max_inline_bytes + 1, b'1');
        assert_eq!(default_error(&bulk), "Protocol error: too big bulk count string");
        // A header longer than any number but ended is an invalid length, as in Redis.
        let mut long_count = b"*".to_vec();
        long_count.resize(30, b'1');
        long_count.extend_from_slice(b"\r\n");
        assert_eq!(default_error(&long_count), "Protocol error: invalid multibulk length");
    }

    #[test]
    fn applies_configured_limits() {
        let limits = Limits { max_bulk_bytes: 4, max_multibulk_len: 2, max_inline_bytes: 8 };
        let stage = AuthStage::Authenticated;
        assert_eq!(parse_all(&command(&[b"GET", b"abcd"]), &limits).unwrap(), vec![owned(&[b"GET", b"abcd"])]);
        assert_eq!(error_of(&command(&[b"GET", b"abcde"]), &limits, stage), "Protocol error: invalid bulk length");
        assert_eq!(error_of(b"*3\r\n", &limits, stage), "Protocol error: invalid multibulk length");
        assert_eq!(parse_all(b"GET abcd\r\n", &limits).unwrap(), vec![owned(&[b"GET", b"abcd"])]);
        assert_eq!(error_of(b"GET abcde\r\n", &limits, stage), "Protocol error: too big inline request");
        assert_eq!(error_of(b"*1\r\n$123456789", &limits, stage), "Protocol error: too big bulk count string");
    }

    #[test]
    fn applies_redis_unauthenticated_limits() {
        let limits = Limits::default();
        let stage = AuthStage::Unauthenticated;
        assert_eq!(error_of(b"*11\r\n", &limits, stage), "Protocol error: unauthenticated multibulk length");
        assert_eq!(
            error_of(b"*2\r\n$4\r\nAUTH\r\n$16385\r\n", &limits, stage),
            "Protocol error: unauthenticated bulk length"
        );
        for at_the_limit in [&b"*10\r\n"[..], b"*2\r\n$4\r\nAUTH\r\n$16384\r\n"] {
            let mut parser = CommandParser::new(limits);
            assert_eq!(parser.parse(&mut BytesMut::from(at_the_limit), stage).unwrap(), None);
        }
        // Out-of-range counts are still "invalid", checked first as in Redis.
        assert_eq!(error_of(b"*3000000000\r\n", &limits, stage), "Protocol error: invalid multibulk length");
        // Once authenticated the ordinary limits apply.
        let big = command(&[b"SET", b"k", &[b'v'; 20_000]]);
        assert_eq!(parse_all(&big, &limits).unwrap().len(), 1);
    }

    #[test]
    fn skips_empty_commands() {
        for input in [&b"*0\r\n"[..], b"*-1\r\n", b"*-10\r\n", b"\r\n", b"\n", b"   \t \r\n"] {
            let mut buf = BytesMut::from(input);
            assert_eq!(parse_command(&mut buf, &Limits::default()).unwrap(), Some(vec![]));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn splits_inline_commands_like_redis() {
        let cases: &[(&[u8], &[&[u8]])] = &[
            (b"PING\r\n", &[b"PING"]),
            (b"PING\n", &[b"PING"]),
            (b"  set   a\tb  \r\n", &[b"set", b"a", b"b"]),
            (b"set a \"b c\"\r\n", &[b"set", b"a", b"b c"]),
            // Answers of redis-server 7.0.15 to the same lines.
            (b"ECHO \"a\\x41\\n\\t\\q\\\\\\\"z\"\r\n", &[b"ECHO", b"aA\n\tq\\\"z"]),
            (b"ECHO 'a\\'b\\n'\r\n", &[b"ECHO", b"a'b\\n"]),
            (b"ECHO \"\\xZZ\"\r\n", &[b"ECHO", b"xZZ"]),
            (b"ECHO ab\"c d\"\r\n", &[b"ECHO", b"abc d"]),
            (b"ECHO \"\\b\\a\\r\"\r\n", &[b"ECHO", b"\x08\x07\r"]),
            (b"ECHO \"\" ''\r\n", &[b"ECHO", b"", b""]),
            (b"ECHO \"a\" 'b'\r\n", &[b"ECHO", b"a", b"b"]),
            (b"ECHO a\x0bb\r\n", &[b"ECHO", b"a\x0bb"]),
            (b"ECHO a\0ignored\r\n", &[b"ECHO", b"a"]),
        ];
        for (line, want) in cases {
            assert_eq!(parse_one(line).unwrap(), Some(owned(want)), "for {:?}", String::from_utf8_lossy(line));
        }
        for bad in [&b"ECHO \"abc\\\"\r\n"[..], b"ECHO \"a\0\"\r\n", b"ECHO 'a\\'\r\n"] {
            assert_eq!(default_error(bad), "Protocol error: unbalanced quotes in request");
        }
    }

    #[test]
    fn skips_unchecked_terminators_as_redis_does() {
        // redis-server 7.0.15 answers two PONGs to this.
        let got = parse_all(b"*1\r\n$4\r\nPINGxy*1\r\n$4\r\nPING\r\n", &Limits::default()).unwrap();
        assert_eq!(got, vec![owned(&[b"PING"]), owned(&[b"PING"])]);
    }

    #[test]
    fn parses_integers_like_string2ll() {
        assert_eq!(parse_integer(b"0"), Some(0));
        assert_eq!(parse_integer(b"-1"), Some(-1));
        assert_eq!(parse_integer(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_integer(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [&b""[..], b"-", b"-0", b"00", b"01", b"+1", b" 1", b"1 ", b"1.5", b"9223372036854775808"] {
            assert_eq!(parse_integer(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse_integer(b"-9223372036854775809"), None);
        assert_eq!(parse_integer(b"123456789012345678901"), None);
    }

    #[test]
    fn recovers_when_the_buffer_is_replaced() {
        let mut parser = CommandParser::new(Limits::default());
        let mut buf = BytesMut::from(&b"*2\r\n$4\r\nECHO\r\n$5\r\nhel"[..]);
        assert_eq!(parser.parse(&mut buf, AuthStage::Authenticated).unwrap(), None);
        let mut other = BytesMut::from(&b"PING\r\n"[..]);
        assert_eq!(parser.parse(&mut other, AuthStage::Authenticated).unwrap(), Some(owned(&[b"PING"])));
    }
}
