//! Accepts the `:authority` that etcd's Go clients send when they dial one endpoint.
//!
//! etcd's client (clientv3 3.4, so etcdctl) dials a single endpoint for the
//! per-endpoint Maintenance calls (`endpoint status|hashkv`, `defrag`, every
//! `--cluster` form) with the gRPC target `passthrough:///<endpoint>`, so when the
//! endpoint is written as a URL the request's HTTP/2 `:authority` is the URL itself,
//! `http://127.0.0.1:2379`. etcd's Go server ignores `:authority`; the `h2` crate
//! under tonic refuses a request whose `:authority` is not a URI authority and resets
//! the stream with PROTOCOL_ERROR, which etcdctl prints as `rpc error: code =
//! Internal desc = stream terminated by RST_STREAM with error code: PROTOCOL_ERROR`.
//!
//! [`AuthorityFix`] sits on the bytes a client connection sends, before hyper sees
//! them. On an HTTP/2 connection (one that starts with the client preface) it reads
//! each header block and, where a literal `:authority` field (named by the static
//! table's index 1, as every HPACK encoder does, or by a literal name) carries
//! `scheme://host:port[/...]`, it replaces the value with `host:port`. Everything
//! else passes unchanged, byte for byte; a block without such a field is forwarded
//! as the frames it arrived in.
//!
//! Why rewriting one field keeps HPACK's dynamic tables in step: the client's
//! encoder and hyper's decoder insert the same fields in the same order; only the
//! rewritten entries are shorter on the server side (an entry's size is its name
//! and value lengths plus 32), so the server's table evicts no earlier than the
//! client's, and every index the client sends (counted from the newest entry) names
//! the same field on both sides: the original one in the client's table, the
//! rewritten one in hyper's.
//!
//! Bounds: a header block is collected whole before it is forwarded, at most
//! [`MAX_HEADER_BLOCK_BYTES`]; a larger block or a frame sequence that breaks
//! HTTP/2's rules is forwarded unchanged and the connection passes through untouched
//! from then on; a block that does not decode is forwarded unchanged. hyper then
//! answers either exactly as it would have without the filter.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest header block collected for inspection. hyper refuses header lists
/// over 16 KiB by default; a block beyond this bound passes through untouched.
pub const MAX_HEADER_BLOCK_BYTES: usize = 64 * 1024;
/// Frame payloads written here are at most HTTP/2's initial SETTINGS_MAX_FRAME_SIZE,
/// which every server accepts.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// Bytes read from the connection per read call.
const READ_CHUNK: usize = 16 * 1024;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

enum Mode {
    /// Matching the first bytes against the HTTP/2 preface.
    Preface,
    /// Inside HTTP/2 framing: `payload_left` bytes of a frame being passed through.
    Frames { payload_left: usize },
    /// Not HTTP/2 (HTTP/1.1 probes and the JSON gateway), or given up on: bytes pass as read.
    Passthrough,
}

/// A header block being collected: the raw frames as received (forwarded as they
/// are when nothing needs rewriting) and the block fragment they carry.
struct Block {
    raw: Vec<u8>,
    fragment: Vec<u8>,
    stream_id: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// The inbound side of a client connection with [`AuthorityFix`] applied.
pub struct AuthorityFix {
    mode: Mode,
    /// Bytes read from the connection, not yet examined.
    input: Vec<u8>,
    /// Examined bytes, ready for hyper.
    output: Vec<u8>,
    /// How much of `output` hyper has taken.
    output_pos: usize,
    block: Option<Block>,
    scratch: Vec<u8>,
    huffman: Option<hpack::huffman::HuffmanDecoder>,
}

impl Default for AuthorityFix {
    fn default() -> Self {
        AuthorityFix {
            mode: Mode::Preface,
            input: Vec::new(),
            output: Vec::new(),
            output_pos: 0,
            block: None,
            scratch: Vec::new(),
            huffman: None,
        }
    }
}

impl AuthorityFix {
    /// Reads from `inner` through the filter into `buf`.
    pub fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if self.output_pos < self.output.len() {
                let n = (self.output.len() - self.output_pos).min(buf.remaining());
                buf.put_slice(&self.output[self.output_pos..self.output_pos + n]);
                self.output_pos += n;
                if self.output_pos == self.output.len() {
                    self.output.clear();
                    self.output_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if matches!(self.mode, Mode::Passthrough) && self.input.is_empty() {
                return Pin::new(inner).poll_read(cx, buf);
            }
            self.scratch.resize(READ_CHUNK, 0);
            let mut read = ReadBuf::new(&mut self.scratch);
            match Pin::new(&mut *inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        // End of stream: whatever is held back goes out as it came.
                        self.give_up();
                        if self.output.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    self.input.extend_from_slice(&self.scratch[..n]);
                    self.process();
                }
            }
        }
    }

    /// Moves every byte held back to the output unchanged and stops filtering
    /// (inside [`Self::process_from`], the Passthrough arm then forwards the rest).
    fn give_up(&mut self) {
        if let Some(block) = self.block.take() {
            self.output.extend_from_slice(&block.raw);
        }
        self.output.append(&mut self.input);
        self.mode = Mode::Passthrough;
    }

    /// Examines `input`, moving what is decided to `output`. Works along a cursor
    /// and drops the examined bytes once at the end, so a read holding many frames
    /// costs one pass, not a shift of the rest per frame.
    fn process(&mut self) {
        let input = std::mem::take(&mut self.input);
        let used = self.process_from(&input);
        self.input = input;
        self.input.drain(..used);
    }

    /// [`Self::process`] over `input`; returns how many bytes it consumed.
    fn process_from(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.mode {
                Mode::Passthrough => {
                    self.output.extend_from_slice(rest);
                    return input.len();
                }
                Mode::Preface => {
                    let n = rest.len().min(PREFACE.len());
                    if rest[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return pos;
                    }
                    self.output.extend_from_slice(PREFACE);
                    pos += PREFACE.len();
                    self.mode = Mode::Frames { payload_left: 0 };
                }
                Mode::Frames { payload_left } if payload_left > 0 => {
                    let n = payload_left.min(rest.len());
                    self.output.extend_from_slice(&rest[..n]);
                    pos += n;
                    self.mode = Mode::Frames { payload_left: payload_left - n };
                    if pos == input.len() {
                        return pos;
                    }
                }
                Mode::Frames { .. } => {
                    if rest.len() < FRAME_HEADER_LEN {
                        return pos;
                    }
                    let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
                    let kind = rest[3];
                    let in_block = self.block.is_some();
                    let is_block_frame = if in_block { kind == CONTINUATION } else { kind == HEADERS };
                    if !is_block_frame {
                        if in_block || kind == CONTINUATION {
                            // Only CONTINUATION frames may follow an unfinished block
                            // (RFC 9113, 6.10); let hyper see and refuse the sequence.
                            self.give_up();
                            continue;
                        }
                        self.output.extend_from_slice(&rest[..FRAME_HEADER_LEN]);
                        pos += FRAME_HEADER_LEN;
                        self.mode = Mode::Frames { payload_left: len };
                        continue;
                    }
                    let held = self.block.as_ref().map_or(0, |b| b.raw.len());
                    if held + FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK_BYTES {
                        self.give_up();
                        continue;
                    }
                    if rest.len() < FRAME_HEADER_LEN + len {
                        return pos;
                    }
                    let frame = &rest[..FRAME_HEADER_LEN + len];
                    if !self.add_to_block(frame) {
                        // Held-back frames first, then this one and the rest (the
                        // Passthrough arm above).
                        self.give_up();
                        continue;
                    }
                    pos += frame.len();
                    if frame[4] & END_HEADERS != 0 {
                        self.finish_block();
                    }
                }
            }
        }
    }

    /// Adds one HEADERS or CONTINUATION frame to the block; false if it is malformed.
    fn add_to_block(&mut self, frame: &[u8]) -> bool {
        let flags = frame[4];
        let mut stream_id = [0u8; 4];
        stream_id.copy_from_slice(&frame[5..9]);
        let payload = &frame[FRAME_HEADER_LEN..];
        match &mut self.block {
            Some(block) => {
                if block.stream_id != stream_id {
                    return false;
                }
                block.raw.extend_from_slice(frame);
                block.fragment.extend_from_slice(payload);
                true
            }
            None => {
                let mut body = payload;
                let mut pad = 0usize;
                if flags & PADDED != 0 {
                    let Some((&p, rest)) = body.split_first() else { return false };
                    pad = p as usize;
                    body = rest;
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    if body.len() < 5 {
                        return false;
                    }
                    let mut p = [0u8; 5];
                    p.copy_from_slice(&body[..5]);
                    priority = Some(p);
                    body = &body[5..];
                }
                if pad > body.len() {
                    return false;
                }
                self.block = Some(Block {
                    raw: frame.to_vec(),
                    fragment: body[..body.len() - pad].to_vec(),
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                });
                true
            }
        }
    }

    /// Forwards a complete header block: rewritten if it carries a URL-form
    /// `:authority`, else as the frames it arrived in.
    fn finish_block(&mut self) {
        let Some(block) = self.block.take() else { return };
        let huffman = self.huffman.get_or_insert_with(hpack::huffman::HuffmanDecoder::new);
        match rewrite_block(&block.fragment, huffman) {
            Some(fragment) => write_headers(&mut self.output, &block, &fragment),
            None => self.output.extend_from_slice(&block.raw),
        }
    }
}

/// Writes `fragment` as a HEADERS frame (and CONTINUATION frames if it is long),
/// keeping the original's stream, END_STREAM and priority, without padding.
fn write_headers(out: &mut Vec<u8>, block: &Block, fragment: &[u8]) {
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let first_len = fragment.len().min(MAX_FRAME_PAYLOAD - priority_len);
    let (first, mut rest) = fragment.split_at(first_len);
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    write_frame_header(out, first.len() + priority_len, HEADERS, flags, block.stream_id);
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        let flags = if tail.is_empty() { END_HEADERS } else { 0 };
        write_frame_header(out, piece.len(), CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(piece);
        rest = tail;
    }
}

fn write_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: [u8; 4]) {
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id);
}

/// The block with every literal URL-form `:authority` replaced by its host:port,
/// or None if no field needed it (or the block does not decode: hyper will say so).
fn rewrite_block(block: &[u8], huffman: &mut hpack::huffman::HuffmanDecoder) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < block.len() {
        let b = block[i];
        if b & 0x80 != 0 {
            // Indexed field: the table entry, already rewritten if it was one.
            i += decode_int(&block[i..], 7)?.1;
            continue;
        }
        if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            i += decode_int(&block[i..], 5)?.1;
            continue;
        }
        // A literal field: with incremental indexing (01), without (0000) or never
        // indexed (0001).
        let prefix = if b & 0xc0 == 0x40 { 6 } else { 4 };
        let (name_index, n) = decode_int(&block[i..], prefix)?;
        i += n;
        let is_authority = if name_index == 0 {
            let (huffman_coded, bytes, n) = decode_string(&block[i..])?;
            i += n;
            let name = if huffman_coded { huffman.decode(bytes).ok()? } else { bytes.to_vec() };
            name == b":authority"
        } else {
            name_index == 1
        };
        let value_at = i;
        let (huffman_coded, bytes, n) = decode_string(&block[i..])?;
        i += n;
        if !is_authority {
            continue;
        }
        let value = if huffman_coded { huffman.decode(bytes).ok()? } else { bytes.to_vec() };
        if let Some(fixed) = fix_authority(&value) {
            let out = out.get_or_insert_with(|| Vec::with_capacity(block.len()));
            out.extend_from_slice(&block[copied..value_at]);
            encode_int(out, 0x00, 7, fixed.len());
            out.extend_from_slice(fixed.as_bytes());
            copied = i;
        }
    }
    let mut out = out?;
    out.extend_from_slice(&block[copied..]);
    Some(out)
}

/// `host:port` for an authority written as a URL (`http://host:port/...`), if the
/// value is not already a valid authority and the rewritten one is.
fn fix_authority(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?;
    if http::uri::Authority::try_from(value).is_ok() {
        return None;
    }
    let (_, rest) = value.split_once("://")?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    http::uri::Authority::try_from(host_port).ok()?;
    Some(host_port.to_string())
}

/// An HPACK integer with an N-bit prefix (RFC 7541, 5.1): (value, bytes used).
fn decode_int(buf: &[u8], prefix_bits: u8) -> Option<(usize, usize)> {
    let max_prefix = (1usize << prefix_bits) - 1;
    let first = (*buf.first()? as usize) & max_prefix;
    if first < max_prefix {
        return Some((first, 1));
    }
    let mut value = max_prefix;
    let mut shift = 0u32;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        // Header fields are bounded by the block size; anything needing more
        // than 28 bits of continuation is malformed.
        if shift > 21 {
            return None;
        }
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn encode_int(out: &mut Vec<u8>, high_bits: u8, prefix_bits: u8, value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(high_bits | value as u8);
        return;
    }
    out.push(high_bits | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// An HPACK string literal (RFC 7541, 5.2): (Huffman-coded, its bytes, bytes used).
fn decode_string(buf: &[u8]) -> Option<(bool, &[u8], usize)> {
    let huffman = *buf.first()? & 0x80 != 0;
    let (len, n) = decode_int(buf, 7)?;
    let end = n.checked_add(len)?;
    Some((huffman, buf.get(n..end)?, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `input` through the filter in pieces of `step` bytes.
    fn filter(input: &[u8], step: usize) -> Vec<u8> {
        let mut fix = AuthorityFix::default();
        for piece in input.chunks(step) {
            fix.input.extend_from_slice(piece);
            fix.process();
        }
        fix.give_up();
        fix.output
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(&mut out, payload.len(), kind, flags, stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn literal(out: &mut Vec<u8>, kind: u8, prefix: u8, name_index: usize, value: &[u8]) {
        encode_int(out, kind, prefix, name_index);
        encode_int(out, 0, 7, value.len());
        out.extend_from_slice(value);
    }

    #[test]
    fn url_authority_becomes_host_port_and_the_rest_is_kept() {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static)
        literal(&mut block, 0x40, 6, 1, b"http://127.0.0.1:2379");
        literal(&mut block, 0x40, 6, 4, b"/etcdserverpb.Maintenance/Status");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));

        let mut want_block = vec![0x83, 0x86];
        literal(&mut want_block, 0x40, 6, 1, b"127.0.0.1:2379");
        literal(&mut want_block, 0x40, 6, 4, b"/etcdserverpb.Maintenance/Status");
        let mut want = PREFACE.to_vec();
        want.extend(frame(0x4, 0, 0, &[]));
        want.extend(frame(HEADERS, END_HEADERS, 1, &want_block));
        want.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        for step in [1, 7, 1000] {
            assert_eq!(filter(&input, step), want, "read in pieces of {step}");
        }
    }

    #[test]
    fn huffman_coded_and_literal_named_authorities_are_rewritten() {
        // "http://a:1" Huffman-coded by an independent encoder (h2's own, via a
        // captured request) is hard to build here; a literal name is easy.
        let mut block = Vec::new();
        encode_int(&mut block, 0x00, 4, 0);
        encode_int(&mut block, 0, 7, 10);
        block.extend_from_slice(b":authority");
        encode_int(&mut block, 0, 7, 17);
        block.extend_from_slice(b"https://host:2379");
        let mut h = hpack::huffman::HuffmanDecoder::new();
        let got = rewrite_block(&block, &mut h).expect("rewritten");
        let mut want = Vec::new();
        encode_int(&mut want, 0x00, 4, 0);
        encode_int(&mut want, 0, 7, 10);
        want.extend_from_slice(b":authority");
        encode_int(&mut want, 0, 7, 9);
        want.extend_from_slice(b"host:2379");
        assert_eq!(got, want);
        // Huffman: "www.example.com" from RFC 7541 C.4.1 is a valid authority, so it
        // is decoded and left alone.
        let huff = [0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff];
        let mut block = vec![0x41, 0x80 | huff.len() as u8];
        block.extend_from_slice(&huff);
        assert_eq!(rewrite_block(&block, &mut h), None);
    }

    #[test]
    fn ordinary_traffic_passes_byte_for_byte() {
        let mut block = vec![0x83, 0x86];
        literal(&mut block, 0x40, 6, 1, b"127.0.0.1:2379");
        let mut input = PREFACE.to_vec();
        // Padded, prioritised HEADERS split over a CONTINUATION.
        let mut payload = vec![2];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(&block[..3]);
        payload.extend_from_slice(&[0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 3, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &block[3..]));
        input.extend(frame(0x0, 0, 3, &[7; 40_000][..]));
        for step in [1, 13, 100_000] {
            assert_eq!(filter(&input, step), input);
        }
        let http1 = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(filter(&http1, 5), http1);
    }

    #[test]
    fn a_rewritten_padded_block_keeps_stream_end_and_priority() {
        let mut block = Vec::new();
        literal(&mut block, 0x00, 4, 1, b"http://10.0.0.1:2379/");
        let mut payload = vec![1];
        payload.extend_from_slice(&[0x80, 0, 0, 1, 200]);
        payload.extend_from_slice(&block);
        payload.push(0);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_HEADERS | END_STREAM, 5, &payload));
        let mut want_block = Vec::new();
        literal(&mut want_block, 0x00, 4, 1, b"10.0.0.1:2379");
        let mut want_payload = vec![0x80, 0, 0, 1, 200];
        want_payload.extend_from_slice(&want_block);
        let mut want = PREFACE.to_vec();
        want.extend(frame(HEADERS, PRIORITY | END_HEADERS | END_STREAM, 5, &want_payload));
        assert_eq!(filter(&input, 3), want);
    }

    #[test]
    fn malformed_or_oversized_blocks_pass_unchanged() {
        // A literal whose length runs past the block.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x41, 0x7f, 0xff, 0xff, 0xff, 0x0f]));
        assert_eq!(filter(&input, 4), input);
        // A block bigger than the bound, then a URL authority that is no longer inspected.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &vec![0x82; MAX_HEADER_BLOCK_BYTES]));
        let mut block = Vec::new();
        literal(&mut block, 0x40, 6, 1, b"http://127.0.0.1:2379");
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block));
        assert_eq!(filter(&input, 4096), input);
        // A HEADERS frame interrupted by another frame type.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"x"));
        assert_eq!(filter(&input, 2), input);
    }

    #[test]
    fn integers_round_trip_and_overlong_ones_are_refused() {
        for v in [0usize, 1, 30, 31, 127, 128, 1337, 16_383, 1 << 20] {
            let mut b = Vec::new();
            encode_int(&mut b, 0, 5, v);
            assert_eq!(decode_int(&b, 5), Some((v, b.len())));
        }
        assert_eq!(decode_int(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], 5), None);
        assert_eq!(decode_int(&[0x1f, 0xff], 5), None);
    }
}
