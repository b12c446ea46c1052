#!/usr/bin/env python3
"""Deterministic Redis Streams session, for comparing a gateway with Redis 7.

Usage: python3 tests/redis/streams_session.py HOST:PORT

Runs a fixed sequence of stream commands and prints one line per command:

    COMMAND ARGS... => REPLY

REPLY is JSON-ish text (bytes decoded as UTF-8, nil as null, RESP3 maps as
{...}); an error reply prints as `!ExceptionClass: message`, exactly as
redis-py reports it (redis-py strips a leading "ERR " from the message).

Replies are the raw wire replies: redis-py's per-command response callbacks are
switched off, so the output does not depend on the redis-py version.

Masking, so that two runs print the same bytes:
  * ids the server generates for `XADD ... *` become ID1, ID2, ... in order of
    first appearance, in replies and in the commands printed;
  * time-dependent numbers (XPENDING idle, XINFO seen-time / active-time /
    inactive / idle, delivery times in XINFO STREAM FULL) print as "<t>";
  * XINFO STREAM radix-tree-keys / radix-tree-nodes (storage layout, not
    semantics) print as "<n>"; HELLO's id and version print as "<n>"/"<v>".

Part 1 uses RESP2 (protocol=2). Part 2 uses RESP3: with redis-py >= 5 through
redis.Redis(protocol=3); with an older redis-py through a minimal RESP3 client
built in below, which yields the same Python values as redis-py's RESP3 parser
(map -> dict, set -> list, null -> None, verbatim -> text without its format),
so the printed lines are the same either way.
"""

import json
import socket
import sys

import redis

KEYS = ["s", "s2", "t", "big", "a", "mx", "g", "mk", "k", "nx"]

TIME_KEYS = {"seen-time", "active-time", "inactive", "idle"}
SIZE_KEYS = {"radix-tree-keys", "radix-tree-nodes"}


def text(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="backslashreplace")
    return v


def fmt(v):
    """Render a reply value as JSON-ish text."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (bytes, str)):
        return json.dumps(text(v), ensure_ascii=False)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ", ".join(fmt(k) + ": " + fmt(x) for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, Masked):
        return str(v)
    return repr(v)


class Masked:
    def __init__(self, tag):
        self.tag = tag

    def __str__(self):
        return self.tag


T = Masked("<t>")
N = Masked("<n>")


def mask_kv(v, extra=None):
    """Mask values of time- or layout-dependent fields, wherever they are.

    Works on RESP2 flat [k, v, k, v] lists and on RESP3 maps; PEL entries in
    XINFO STREAM FULL (a "pending" field holding a list) get their delivery
    time masked.
    """
    masks = {k: T for k in TIME_KEYS}
    masks.update({k: N for k in SIZE_KEYS})
    if extra:
        masks.update(extra)

    def pel(entries):
        out = []
        for e in entries or []:
            e = list(e)
            if len(e) == 4:  # group PEL: id, consumer, delivery-time, count
                e[2] = T
            elif len(e) == 3:  # consumer PEL: id, delivery-time, count
                e[1] = T
            out.append(e)
        return out

    def walk(x):
        if isinstance(x, dict):
            out = {}
            for k, val in x.items():
                key = text(k)
                if key in masks:
                    out[k] = masks[key]
                elif key == "pending" and isinstance(val, list):
                    out[k] = pel(val)
                else:
                    out[k] = walk(val)
            return out
        if isinstance(x, list):
            out = []
            i = 0
            while i < len(x):
                el = x[i]
                key = text(el) if isinstance(el, (bytes, str)) else None
                if key in masks and i + 1 < len(x):
                    out += [el, masks[key]]
                    i += 2
                elif key == "pending" and i + 1 < len(x) and isinstance(x[i + 1], list):
                    out += [el, pel(x[i + 1])]
                    i += 2
                else:
                    out.append(walk(el))
                    i += 1
            return out
        return x

    return walk(v)


def mask_xpending(v):
    """Extended XPENDING: [[id, consumer, idle-ms, deliveries], ...]."""
    if isinstance(v, list) and all(isinstance(e, list) and len(e) == 4 for e in v):
        return [[e[0], e[1], T, e[3]] for e in v]
    return v


def mask_hello(v):
    return mask_kv(v, {"id": N, "version": Masked("<v>")})


class Session:
    def __init__(self, client):
        self.r = client
        # Raw replies: no redis-py post-processing of any command.
        self.r.response_callbacks.clear()
        self.ids = {}  # server-generated id -> placeholder

    def sub(self, v):
        if isinstance(v, (bytes, str)):
            t = text(v)
            return self.ids.get(t, v)
        if isinstance(v, dict):
            return {self.sub(k): self.sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.sub(x) for x in v]
        return v

    def call(self, *args, mask=None, auto_id=False):
        """Send one command, print `command => reply`, return the raw reply."""
        shown = " ".join(str(text(self.sub(a))) for a in args)
        try:
            reply = self.r.execute_command(*args)
        except redis.exceptions.RedisError as e:
            print("%s => !%s: %s" % (shown, type(e).__name__, e), flush=True)
            return e
        if auto_id and isinstance(reply, bytes) and text(reply) not in self.ids:
            self.ids[text(reply)] = "ID%d" % (len(self.ids) + 1)
        out = self.sub(reply)
        if mask:
            out = mask(out)
        print("%s => %s" % (shown, fmt(out)), flush=True)
        return reply

    def bulk(self, label, commands):
        """Send many commands, print one summary line with the last reply."""
        last = None
        for c in commands:
            last = self.r.execute_command(*c)
        print("%s (%d commands) => last %s" % (label, len(commands), fmt(last)), flush=True)


def part_resp2(x):
    c = x.call
    print("# --- part 1: RESP2 ---")
    c("DEL", *KEYS)
    c("PING")
    c("PING", "hello")

    print("# XADD: explicit ids, ordering, id syntax")
    c("XADD", "s", "1-1", "name", "alice")
    c("XADD", "s", "1-2", "name", "bob", "age", "30")
    c("XADD", "s", "2-0", "f", "v")
    c("XADD", "s", "2-0", "f", "v")
    c("XADD", "s", "1-5", "f", "v")
    c("XADD", "s", "0-0", "f", "v")
    c("XADD", "nx", "0-0", "f", "v")
    c("XADD", "nx", "0-1", "f", "v")
    c("DEL", "nx")
    c("XADD", "s", "3", "f", "v")
    c("XADD", "s", "5-*", "f", "v")
    c("XADD", "s", "5-*", "f", "v")
    c("XADD", "s", "4-*", "f", "v")
    c("XADD", "s", "abc", "f", "v")
    c("XADD", "s", "6-x", "f", "v")
    c("XADD", "s", "-1", "f", "v")
    c("XADD", "s", "6-0-0", "f", "v")
    c("XADD", "s", "6-0", "f")
    c("XADD", "s", "6-0", "f", "v", "g")
    c("XADD", "s", "6-0")
    c("XADD", "s")
    c("XADD", "s", "6-0", "f", "v", "f", "w")
    c("XADD", "s", "7-0", "", "")
    c("XRANGE", "s", "6-0", "+")
    c("XADD", "nx", "NOMKSTREAM", "*", "f", "v")
    c("XADD", "nx", "NOMKSTREAM", "1-1", "f", "v")
    c("EXISTS", "nx")
    c("XADD", "s", "NOMKSTREAM", "8-0", "f", "v")
    c("XADD", "s", "MAXLEN", "abc", "9-0", "f", "v")
    c("XADD", "s", "MAXLEN", "-1", "9-0", "f", "v")
    c("XADD", "s", "MAXLEN", "5", "MINID", "1", "9-0", "f", "v")
    c("XADD", "s", "LIMIT", "10", "9-0", "f", "v")
    c("XADD", "s", "MAXLEN", "=", "5", "LIMIT", "10", "9-0", "f", "v")
    c("XADD", "s", "MINID", "abc", "9-0", "f", "v")
    c("XLEN", "s")
    c("XLEN", "nx")
    c("XADD", "mx", "18446744073709551615-18446744073709551615", "f", "v")
    c("XADD", "mx", "*", "f", "v")
    c("XADD", "mx", "18446744073709551615-*", "f", "v")
    c("XADD", "mx", "18446744073709551616-0", "f", "v")

    print("# XADD with auto ids (*)")
    c("XADD", "a", "*", "f", "1", auto_id=True)
    c("XADD", "a", "*", "f", "2", auto_id=True)
    c("XADD", "a", "1-1", "f", "v")
    c("XLEN", "a")
    c("XRANGE", "a", "-", "+")

    print("# XRANGE / XREVRANGE")
    c("XRANGE", "s", "-", "+")
    c("XRANGE", "s", "-", "+", "COUNT", "2")
    c("XRANGE", "s", "-", "+", "COUNT", "0")
    c("XRANGE", "s", "-", "+", "COUNT", "-1")
    c("XRANGE", "s", "-", "+", "COUNT", "x")
    c("XRANGE", "s", "-", "+", "COUNT")
    c("XRANGE", "s", "-", "+", "LIMIT", "1")
    c("XRANGE", "s", "2", "5")
    c("XRANGE", "s", "5", "5")
    c("XRANGE", "s", "(1-1", "(5-1")
    c("XRANGE", "s", "(1", "+")
    c("XRANGE", "s", "-", "(5")
    c("XRANGE", "s", "(0-0", "(1-2")
    c("XRANGE", "s", "6-0", "1-0")
    c("XRANGE", "s", "(-", "+")
    c("XRANGE", "s", "-", "(+")
    c("XRANGE", "s", "(18446744073709551615-18446744073709551615", "+")
    c("XRANGE", "s", "-", "(0-0")
    c("XRANGE", "s", "abc", "+")
    c("XRANGE", "nx", "-", "+")
    c("XRANGE", "s", "-")
    c("XREVRANGE", "s", "+", "-")
    c("XREVRANGE", "s", "+", "-", "COUNT", "2")
    c("XREVRANGE", "s", "+", "-", "COUNT", "0")
    c("XREVRANGE", "s", "5", "2")
    c("XREVRANGE", "s", "(5-1", "(1-1")
    c("XREVRANGE", "s", "-", "+")
    c("XREVRANGE", "nx", "+", "-")

    print("# XREAD")
    c("XADD", "s2", "1-0", "x", "1")
    c("XADD", "s2", "2-0", "x", "2")
    c("XREAD", "STREAMS", "s", "0")
    c("XREAD", "COUNT", "2", "STREAMS", "s", "0-0")
    c("XREAD", "COUNT", "1", "STREAMS", "s", "s2", "0", "1")
    c("XREAD", "STREAMS", "s", "s2", "5-0", "0")
    c("XREAD", "STREAMS", "s", "7-0")
    c("XREAD", "STREAMS", "s", "$")
    c("XREAD", "STREAMS", "nx", "0")
    c("XREAD", "STREAMS", "nx", "s2", "0", "1-0")
    c("XREAD", "COUNT", "0", "STREAMS", "s2", "0")
    c("XREAD", "STREAMS", "s")
    c("XREAD", "STREAMS", "s", "s2", "0")
    c("XREAD", "COUNT", "1", "s", "0")
    c("XREAD", "STREAMS", "s", ">")
    c("XREAD", "STREAMS", "s", "abc")
    c("XREAD", "BLOCK", "-1", "STREAMS", "s", "$")
    c("XREAD", "BLOCK", "abc", "STREAMS", "s", "$")
    c("XREAD", "BLOCK", "100", "STREAMS", "s", "$")
    c("XREAD", "BLOCK", "100", "STREAMS", "s", "0")

    print("# XDEL")
    c("XDEL", "s", "2-0")
    c("XDEL", "s", "2-0", "99-0")
    c("XDEL", "s", "1-1", "1-2", "1-1")
    c("XDEL", "nx", "1-1")
    c("XDEL", "s", "abc")
    c("XDEL", "s")
    c("XLEN", "s")
    c("XRANGE", "s", "-", "+")

    print("# XTRIM and XADD trimming")
    x.bulk("XADD t <i>-0 f <i> for i=1..10", [("XADD", "t", "%d-0" % i, "f", str(i)) for i in range(1, 11)])
    c("XADD", "t", "MAXLEN", "=", "8", "11-0", "f", "11")
    c("XLEN", "t")
    c("XADD", "t", "MAXLEN", "7", "12-0", "f", "12")
    c("XADD", "t", "MAXLEN", "~", "2", "13-0", "f", "13")
    c("XLEN", "t")
    c("XADD", "t", "MINID", "9", "14-0", "f", "14")
    c("XRANGE", "t", "-", "+")
    c("XADD", "t", "MAXLEN", "~", "1", "LIMIT", "10", "15-0", "f", "15")
    c("XLEN", "t")
    c("XTRIM", "t", "MAXLEN", "5")
    c("XTRIM", "t", "MAXLEN", "~", "1")
    c("XTRIM", "t", "MAXLEN", "~", "1", "LIMIT", "100")
    c("XTRIM", "t", "MINID", "12")
    c("XTRIM", "t", "MINID", "=", "13")
    c("XRANGE", "t", "-", "+")
    c("XTRIM", "t", "MAXLEN", "1", "LIMIT", "10")
    c("XTRIM", "t", "FOO", "1")
    c("XTRIM", "t", "MAXLEN")
    c("XTRIM", "t")
    c("XTRIM", "nx", "MAXLEN", "0")
    c("XTRIM", "t", "MAXLEN", "0")
    c("XLEN", "t")
    c("EXISTS", "t")
    c("XINFO", "STREAM", "t", mask=mask_kv)
    x.bulk("XADD big <i>-0 f <i> for i=1..250", [("XADD", "big", "%d-0" % i, "f", str(i)) for i in range(1, 251)])
    c("XTRIM", "big", "MAXLEN", "~", "240")
    c("XTRIM", "big", "MAXLEN", "~", "120", "LIMIT", "50")
    c("XTRIM", "big", "MAXLEN", "~", "120")
    c("XLEN", "big")
    c("XRANGE", "big", "-", "+", "COUNT", "1")
    c("XADD", "big", "MINID", "~", "200", "251-0", "f", "251")
    c("XLEN", "big")
    c("XTRIM", "big", "MAXLEN", "~", "0")
    c("XLEN", "big")

    print("# DEL of a stream")
    c("DEL", "s2")
    c("XLEN", "s2")
    c("EXISTS", "s2")
    c("TYPE", "s")

    print("# consumer groups: XGROUP CREATE")
    c("XADD", "g", "1-0", "a", "1")
    c("XADD", "g", "2-0", "b", "2")
    c("XADD", "g", "3-0", "c", "3")
    c("XGROUP", "CREATE", "g", "g1", "0")
    c("XGROUP", "CREATE", "g", "g1", "0")
    c("XGROUP", "CREATE", "g", "g2", "$")
    c("XGROUP", "CREATE", "g", "g3", "0", "ENTRIESREAD", "1")
    c("XGROUP", "CREATE", "g", "g4", "0", "ENTRIESREAD", "-5")
    c("XGROUP", "CREATE", "g", "g4", "abc")
    c("XGROUP", "CREATE", "g", "g4", "0", "FOO")
    c("XGROUP", "CREATE", "nx", "gx", "$")
    c("XGROUP", "CREATE", "mk", "gm", "$", "MKSTREAM")
    c("XGROUP", "CREATE", "mk", "gm", "$", "MKSTREAM")
    c("XLEN", "mk")
    c("TYPE", "mk")
    c("XGROUP", "CREATE", "g")
    c("XGROUP", "FOO", "g", "g1")
    c("XGROUP")
    c("XINFO", "GROUPS", "g", mask=mask_kv)

    print("# XREADGROUP")
    c("XREADGROUP", "GROUP", "g1", "c1", "COUNT", "1", "STREAMS", "g", ">")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g", ">")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g", ">")
    c("XREADGROUP", "GROUP", "g1", "c2", "STREAMS", "g", "0")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g", "0")
    c("XREADGROUP", "GROUP", "g1", "c1", "COUNT", "1", "STREAMS", "g", "1-0")
    c("XREADGROUP", "GROUP", "gx", "c1", "STREAMS", "g", ">")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "nx", ">")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g", "$")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g", "abc")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g")
    c("XREADGROUP", "GROUP", "g1", "STREAMS", "g", ">")
    c("XREADGROUP", "STREAMS", "g", ">")
    c("XREADGROUP", "GROUP", "g1", "c1", "BLOCK", "100", "STREAMS", "g", ">")
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XADD", "g", "4-0", "d", "4")
    c("XADD", "g", "5-0", "e", "5")
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XREADGROUP", "GROUP", "g2", "c1", "NOACK", "STREAMS", "g", ">")
    c("XPENDING", "g", "g2")
    c("XREADGROUP", "GROUP", "g2", "c1", "STREAMS", "g", "0")

    print("# XACK / XPENDING")
    c("XACK", "g", "g1", "1-0")
    c("XACK", "g", "g1", "1-0", "99-0")
    c("XACK", "g", "gx", "2-0")
    c("XACK", "nx", "g1", "2-0")
    c("XACK", "g", "g1", "abc")
    c("XACK", "g", "g1")
    c("XPENDING", "g", "g1")
    c("XPENDING", "g", "g1", "-", "+", "10", mask=mask_xpending)
    c("XPENDING", "g", "g1", "-", "+", "10", "c1", mask=mask_xpending)
    c("XPENDING", "g", "g1", "-", "+", "10", "c9", mask=mask_xpending)
    c("XPENDING", "g", "g1", "IDLE", "0", "-", "+", "10", mask=mask_xpending)
    c("XPENDING", "g", "g1", "IDLE", "100000000", "-", "+", "10", mask=mask_xpending)
    c("XPENDING", "g", "g1", "(2-0", "+", "10", mask=mask_xpending)
    c("XPENDING", "g", "g1", "-", "+", "1", mask=mask_xpending)
    c("XPENDING", "g", "g1", "-", "+", "0", mask=mask_xpending)
    c("XPENDING", "g", "g1", "-", "+", "-1", mask=mask_xpending)
    c("XPENDING", "g", "g1", "-", "+")
    c("XPENDING", "g", "g1", "IDLE", "10")
    c("XPENDING", "g", "g1", "-", "+", "x")
    c("XPENDING", "g", "gx")
    c("XPENDING", "nx", "g1")
    c("XPENDING", "g", "g3")
    c("XPENDING", "g")

    print("# XCLAIM")
    c("XREADGROUP", "GROUP", "g1", "c2", "STREAMS", "g", ">")
    c("XPENDING", "g", "g1", "-", "+", "10", mask=mask_xpending)
    c("XCLAIM", "g", "g1", "c3", "0", "2-0")
    c("XPENDING", "g", "g1", "-", "+", "10", mask=mask_xpending)
    c("XCLAIM", "g", "g1", "c3", "0", "2-0", "JUSTID")
    c("XPENDING", "g", "g1", "-", "+", "10", mask=mask_xpending)
    c("XCLAIM", "g", "g1", "c3", "0", "3-0", "RETRYCOUNT", "7")
    c("XPENDING", "g", "g1", "-", "+", "10", mask=mask_xpending)
    c("XCLAIM", "g", "g1", "c3", "0", "3-0", "IDLE", "100000000", "JUSTID")
    c("XPENDING", "g", "g1", "IDLE", "99000000", "-", "+", "10", mask=mask_xpending)
    c("XCLAIM", "g", "g1", "c3", "0", "99-0")
    c("XCLAIM", "g", "g1", "c3", "0", "1-0")
    c("XCLAIM", "g", "g1", "c3", "0", "1-0", "FORCE", "JUSTID")
    c("XCLAIM", "g", "g1", "c3", "0", "99-0", "FORCE")
    c("XCLAIM", "g", "g1", "c3", "100000000", "4-0")
    c("XCLAIM", "g", "g1", "c3", "0", "4-0", "5-0", "LASTID", "5-0", "JUSTID")
    c("XPENDING", "g", "g1")
    c("XCLAIM", "g", "gx", "c3", "0", "1-0")
    c("XCLAIM", "nx", "g1", "c3", "0", "1-0")
    c("XCLAIM", "g", "g1", "c3", "abc", "1-0")
    c("XCLAIM", "g", "g1", "c3", "0", "abc")
    c("XCLAIM", "g", "g1", "c3", "0", "1-0", "RETRYCOUNT", "x")
    c("XCLAIM", "g", "g1", "c3", "0")
    c("XDEL", "g", "2-0")
    c("XCLAIM", "g", "g1", "c1", "0", "2-0", "3-0")
    c("XPENDING", "g", "g1", "-", "+", "10", mask=mask_xpending)
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g", "0")

    print("# XAUTOCLAIM")
    c("XREADGROUP", "GROUP", "g3", "c1", "STREAMS", "g", ">")
    c("XDEL", "g", "4-0")
    c("XREADGROUP", "GROUP", "g3", "c1", "STREAMS", "g", "0")
    c("XAUTOCLAIM", "g", "g3", "c2", "0", "0-0", "COUNT", "1")
    c("XAUTOCLAIM", "g", "g3", "c2", "0", "3-0", "COUNT", "1")
    c("XAUTOCLAIM", "g", "g3", "c2", "0", "0-0")
    c("XPENDING", "g", "g3", "-", "+", "10", mask=mask_xpending)
    c("XAUTOCLAIM", "g", "g3", "c4", "0", "0", "JUSTID")
    c("XPENDING", "g", "g3", "-", "+", "10", mask=mask_xpending)
    c("XAUTOCLAIM", "g", "g3", "c4", "100000000", "0-0")
    c("XAUTOCLAIM", "g", "g3", "c4", "0", "(3-0")
    c("XAUTOCLAIM", "g", "g3", "c4", "0", "0", "COUNT", "0")
    c("XAUTOCLAIM", "g", "g3", "c4", "0", "0", "COUNT", "x")
    c("XAUTOCLAIM", "g", "gx", "c4", "0", "0")
    c("XAUTOCLAIM", "nx", "g3", "c4", "0", "0")
    c("XAUTOCLAIM", "g", "g3", "c4", "abc", "0")
    c("XAUTOCLAIM", "g", "g3", "c4", "0", "abc")
    c("XAUTOCLAIM", "g", "g3", "c4", "0")

    print("# XGROUP SETID / CREATECONSUMER / DELCONSUMER / DESTROY")
    c("XGROUP", "CREATECONSUMER", "g", "g1", "c9")
    c("XGROUP", "CREATECONSUMER", "g", "g1", "c9")
    c("XGROUP", "CREATECONSUMER", "g", "gx", "c9")
    c("XGROUP", "CREATECONSUMER", "nx", "g1", "c9")
    c("XINFO", "CONSUMERS", "g", "g1", mask=mask_kv)
    c("XGROUP", "DELCONSUMER", "g", "g1", "c3")
    c("XGROUP", "DELCONSUMER", "g", "g1", "c9")
    c("XGROUP", "DELCONSUMER", "g", "g1", "nobody")
    c("XGROUP", "DELCONSUMER", "g", "gx", "c1")
    c("XPENDING", "g", "g1")
    c("XGROUP", "SETID", "g", "g1", "0")
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XGROUP", "SETID", "g", "g1", "$", "ENTRIESREAD", "3")
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XGROUP", "SETID", "g", "g1", "3-0")
    c("XGROUP", "SETID", "g", "gx", "0")
    c("XGROUP", "SETID", "nx", "g1", "0")
    c("XGROUP", "SETID", "g", "g1", "abc")
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g", ">")
    c("XGROUP", "DESTROY", "g", "g2")
    c("XGROUP", "DESTROY", "g", "g2")
    c("XGROUP", "DESTROY", "nx", "g2")
    c("XGROUP", "HELP", mask=lambda v: len(v) if isinstance(v, list) else v)

    print("# XINFO")
    c("XINFO", "STREAM", "g", mask=mask_kv)
    c("XINFO", "STREAM", "g", "FULL", mask=mask_kv)
    c("XINFO", "STREAM", "g", "FULL", "COUNT", "1", mask=mask_kv)
    c("XINFO", "STREAM", "mk", mask=mask_kv)
    c("XINFO", "STREAM", "mk", "FULL", mask=mask_kv)
    c("XINFO", "STREAM", "s", mask=mask_kv)
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XINFO", "CONSUMERS", "g", "g1", mask=mask_kv)
    c("XINFO", "CONSUMERS", "g", "g3", mask=mask_kv)
    c("XINFO", "STREAM", "nx")
    c("XINFO", "GROUPS", "nx")
    c("XINFO", "CONSUMERS", "nx", "g1")
    c("XINFO", "CONSUMERS", "g", "gx")
    c("XINFO", "STREAM", "g", "FOO")
    c("XINFO", "FOO", "g")
    c("XINFO")

    print("# entries-read / lag")
    c("XGROUP", "CREATE", "g", "lagger", "0")
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XREADGROUP", "GROUP", "lagger", "c", "COUNT", "1", "STREAMS", "g", ">")
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XREADGROUP", "GROUP", "lagger", "c", "STREAMS", "g", ">")
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XADD", "g", "6-0", "f", "6")
    c("XINFO", "GROUPS", "g", mask=mask_kv)

    print("# WRONGTYPE")
    c("SET", "k", "v")
    c("XADD", "k", "1-0", "f", "v")
    c("XLEN", "k")
    c("XRANGE", "k", "-", "+")
    c("XREVRANGE", "k", "+", "-")
    c("XREAD", "STREAMS", "k", "0")
    c("XDEL", "k", "1-0")
    c("XTRIM", "k", "MAXLEN", "0")
    c("XGROUP", "CREATE", "k", "g1", "$")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "k", ">")
    c("XACK", "k", "g1", "1-0")
    c("XPENDING", "k", "g1")
    c("XCLAIM", "k", "g1", "c1", "0", "1-0")
    c("XAUTOCLAIM", "k", "g1", "c1", "0", "0")
    c("XINFO", "STREAM", "k")
    c("XINFO", "GROUPS", "k")
    c("GET", "g")

    print("# unknown command / arity")
    c("XFOO", "s", "1")
    c("XLEN")
    c("XLEN", "s", "extra")
    c("XRANGE", "s", "-")
    c("XREVRANGE", "s")
    c("XDEL")
    c("XACK", "g", "g1")
    c("XINFO", "STREAM")
    c("XGROUP", "DESTROY", "g")


def part_resp3(host, port):
    print("# --- part 2: RESP3 ---")
    try:
        client = redis.Redis(host=host, port=port, protocol=3)
        client.execute_command("PING")
    except (TypeError, redis.exceptions.RedisError):
        client = Resp3Client(host, port)
    x = Session(client)
    c = x.call
    c("HELLO", "3", mask=mask_hello)
    c("XLEN", "g")
    c("XRANGE", "g", "-", "+", "COUNT", "2")
    c("XRANGE", "nx", "-", "+")
    c("XREAD", "COUNT", "1", "STREAMS", "g", "s", "0", "0")
    c("XREAD", "STREAMS", "nx", "0")
    c("XREAD", "BLOCK", "100", "STREAMS", "g", "$")
    c("XREADGROUP", "GROUP", "g1", "c1", "COUNT", "1", "STREAMS", "g", "0")
    c("XREADGROUP", "GROUP", "g1", "c1", "STREAMS", "g", ">")
    c("XPENDING", "g", "g1")
    c("XPENDING", "g", "g1", "-", "+", "10", mask=mask_xpending)
    c("XAUTOCLAIM", "g", "g1", "c1", "0", "0-0", "COUNT", "1")
    c("XINFO", "STREAM", "g", mask=mask_kv)
    c("XINFO", "STREAM", "g", "FULL", "COUNT", "1", mask=mask_kv)
    c("XINFO", "GROUPS", "g", mask=mask_kv)
    c("XINFO", "CONSUMERS", "g", "g1", mask=mask_kv)
    c("XADD", "g", "6-0", "f", "v")
    c("XREADGROUP", "GROUP", "gx", "c1", "STREAMS", "g", ">")
    c("DEL", *KEYS)


class Resp3Client:
    """Minimal RESP3 client for redis-py versions without protocol=3.

    Returns the same Python values as redis-py's RESP3 parser and raises the
    same exception classes for error replies.
    """

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port))
        self.buf = b""
        self.response_callbacks = {}
        self.execute_command("HELLO", "3")

    def execute_command(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        reply = self.read()
        if isinstance(reply, redis.exceptions.RedisError):
            raise reply
        return reply

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        ln, self.buf = self.buf.split(b"\r\n", 1)
        return ln

    def exact(self, n):
        while len(self.buf) < n + 2:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise redis.exceptions.ConnectionError("connection closed")
        self.buf += chunk

    def read(self):
        ln = self.line()
        t, rest = ln[:1], ln[1:]
        if t == b"+":
            return rest
        if t in (b"-", b"!"):
            msg = rest if t == b"-" else self.exact(int(rest))
            return self.error(msg.decode("utf-8", errors="replace"))
        if t in (b":", b"("):
            return int(rest)
        if t == b",":
            return float(rest)
        if t == b"#":
            return rest == b"t"
        if t == b"_":
            return None
        if t in (b"$", b"="):
            n = int(rest)
            if n < 0:
                return None
            data = self.exact(n)
            return data[4:] if t == b"=" else data
        if t in (b"*", b"~", b">"):
            n = int(rest)
            if n < 0:
                return None
            return [self.read() for _ in range(n)]
        if t == b"%":
            d = {}
            for _ in range(int(rest)):
                k = self.read()
                d[k] = self.read()
            return d
        if t == b"|":
            for _ in range(2 * int(rest)):
                self.read()
            return self.read()
        raise redis.exceptions.InvalidResponse("unknown RESP3 type %r" % ln)

    @staticmethod
    def error(msg):
        classes = {
            "EXECABORT": redis.exceptions.ExecAbortError,
            "LOADING": redis.exceptions.BusyLoadingError,
            "NOSCRIPT": redis.exceptions.NoScriptError,
            "READONLY": redis.exceptions.ReadOnlyError,
            "NOAUTH": redis.exceptions.AuthenticationError,
            "NOPERM": redis.exceptions.NoPermissionError,
        }
        code = msg.split(" ")[0]
        if code == "ERR":
            return redis.exceptions.ResponseError(msg[4:])
        if code in classes:
            return classes[code](msg[len(code) + 1:])
        return redis.exceptions.ResponseError(msg)


def main():
    if len(sys.argv) != 2 or ":" not in sys.argv[1]:
        sys.exit("usage: streams_session.py HOST:PORT")
    host, port = sys.argv[1].rsplit(":", 1)
    port = int(port)
    try:
        client = redis.Redis(host=host, port=port, protocol=2)
    except TypeError:  # redis-py < 5 has no protocol argument; it speaks RESP2
        client = redis.Redis(host=host, port=port)
    part_resp2(Session(client))
    part_resp3(host, port)


if __name__ == "__main__":
    main()
