"""boto3 against concord's S3 API (run by tests/s3.rs).

    boto3_client.py ENDPOINT ACCESS_KEY_ID SECRET_ACCESS_KEY CHECKSUM_MODE [READ_ENDPOINT]

CHECKSUM_MODE is botocore's request_checksum_calculation: "when_supported" (the
default since botocore 1.36: a CRC32 goes with every upload) or "when_required".
READ_ENDPOINT, if given, is another member's S3 endpoint: the large objects are
read back through it as well.

Every step runs even when an earlier one failed (unless it needs what failed);
each failed check is printed as "FAIL <step>: <what>, expected ..., got ...".
Exit status 1 when any check failed.
"""

import base64
import datetime
import hashlib
import hmac
import http.client
import io
import os
import sys
import time
import traceback
import urllib.parse
import zlib

import boto3
import botocore
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

MiB = 1 << 20
REGION = "us-east-1"

ENDPOINT, KEY_ID, SECRET, MODE = sys.argv[1:5]
READ_ENDPOINT = sys.argv[5] if len(sys.argv) > 5 else None
BUCKET = "boto-" + MODE.replace("_", "-")

failures = []
server_errors = []  # 5xx answers seen (botocore may have retried them)


class CheckFailed(Exception):
    pass


def check(cond, what, expected=None, got=None):
    if not cond:
        msg = what
        if expected is not None or got is not None:
            msg += f": expected {expected!r}, got {got!r}"
        raise CheckFailed(msg)


def check_eq(got, expected, what):
    check(got == expected, what, expected, got)


def check_bytes(got, expected, what):
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise CheckFailed(
            f"{what}: content differs: expected {len(expected)} bytes (md5 {md5hex(expected)}), "
            f"got {len(got)} bytes (md5 {md5hex(got)}), first difference at byte {first}"
        )


def expect_error(fn, code, status, what):
    """Runs fn, which must fail with S3 error `code` (None: any) and HTTP `status`."""
    try:
        fn()
    except ClientError as e:
        got_code = e.response.get("Error", {}).get("Code")
        got_status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        check(
            (code is None or got_code == code) and got_status == status,
            f"{what}: wrong error",
            f"{code} ({status})",
            f"{got_code} ({got_status}): {e}",
        )
        return got_code
    raise CheckFailed(f"{what}: expected error {code} ({status}), but the request succeeded")


def md5hex(data):
    return hashlib.md5(data).hexdigest()


def quoted_md5(data):
    return '"' + md5hex(data) + '"'


def multipart_etag(parts):
    return '"' + hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f'-{len(parts)}"'


def b64(raw):
    return base64.b64encode(raw).decode()


def crc32_b64(data):
    return b64(zlib.crc32(data).to_bytes(4, "big"))


_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c_b64(data):
    c = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return b64((c ^ 0xFFFFFFFF).to_bytes(4, "big"))


def note_retried(response_dict=None, exception=None, context=None, event_name="", **_):
    """Every attempt's answer (botocore retries 5xx and connection errors): 5xx
    and failed connections are printed as notes at the end."""
    op = event_name.rsplit(".", 1)[-1]
    if exception is not None:
        server_errors.append(f"{op}: {type(exception).__name__}: {exception}")
    elif response_dict is not None and response_dict.get("status_code", 0) >= 500:
        body = response_dict.get("body", b"")
        server_errors.append(f"{op}: HTTP {response_dict['status_code']} {body[:300]!r}")


sent_checksum_headers = []  # per PutObject sent: its x-amz-checksum-* header names


def note_sent_checksums(request=None, **_):
    if request is not None and request.method == "PUT" and "uploadId=" not in request.url:
        sent_checksum_headers.append(sorted(k.lower() for k in request.headers.keys() if k.lower().startswith("x-amz-checksum-")))


def client(endpoint=ENDPOINT, key=KEY_ID, secret=SECRET, signed=True):
    config = Config(
        region_name=REGION,
        signature_version="s3v4" if signed else botocore.UNSIGNED,
        s3={"addressing_style": "path"},
        request_checksum_calculation=MODE,
        response_checksum_validation=MODE,
        retries={"mode": "standard", "total_max_attempts": 3},
        connect_timeout=10,
        read_timeout=120,
    )
    c = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret, config=config
    )
    c.meta.events.register("response-received.s3", note_retried)
    c.meta.events.register("before-send.s3.PutObject", note_sent_checksums)
    return c


s3 = client()
s3_read = client(READ_ENDPOINT) if READ_ENDPOINT else None


def head_absent(key, what, bucket=BUCKET):
    expect_error(lambda: s3.head_object(Bucket=bucket, Key=key), "404", 404, what)


# ----- the steps -----


def step_buckets():
    s3.create_bucket(Bucket=BUCKET)
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    check(BUCKET in names, "list_buckets after create_bucket", f"{BUCKET} listed", names)
    s3.head_bucket(Bucket=BUCKET)
    s3.get_bucket_location(Bucket=BUCKET)
    expect_error(lambda: s3.create_bucket(Bucket=BUCKET), "BucketAlreadyOwnedByYou", 409, "create_bucket again")
    expect_error(lambda: s3.head_bucket(Bucket="no-such-bucket-x"), "404", 404, "head_bucket of a missing bucket")
    expect_error(
        lambda: s3.list_objects_v2(Bucket="no-such-bucket-x"), "NoSuchBucket", 404, "list_objects_v2 of a missing bucket"
    )
    expect_error(
        lambda: s3.put_object(Bucket="no-such-bucket-x", Key="k", Body=b"x"),
        "NoSuchBucket",
        404,
        "put_object into a missing bucket",
    )


objects = {}


def step_put_get():
    for name, size in [("empty", 0), ("one-kib", 1024), ("five-mib", 5 * MiB)]:
        objects[name] = os.urandom(size)
    for name, data in objects.items():
        sent_checksum_headers.clear()
        r = s3.put_object(Bucket=BUCKET, Key=name, Body=data)
        # The test's self-check that the mode does what it says (each attempt).
        want = ["x-amz-checksum-crc32"] if MODE == "when_supported" else []
        check(
            sent_checksum_headers and all(h == want for h in sent_checksum_headers),
            f"test self-check: checksum headers boto3 sent ({MODE})",
            want,
            sent_checksum_headers,
        )
        check_eq(r.get("ETag"), quoted_md5(data), f"put_object {name} ({len(data)} B) ETag")
        g = s3.get_object(Bucket=BUCKET, Key=name)
        check_bytes(g["Body"].read(), data, f"get_object {name}")
        check_eq(g["ContentLength"], len(data), f"get_object {name} ContentLength")
        check_eq(g.get("ETag"), quoted_md5(data), f"get_object {name} ETag")
        if s3_read is not None:
            check_bytes(
                s3_read.get_object(Bucket=BUCKET, Key=name)["Body"].read(), data, f"get_object {name} via another member"
            )


def step_range():
    data = objects["one-kib"]
    g = s3.get_object(Bucket=BUCKET, Key="one-kib", Range="bytes=10-99")
    check_eq(g["ResponseMetadata"]["HTTPStatusCode"], 206, "range bytes=10-99 status")
    check_bytes(g["Body"].read(), data[10:100], "range bytes=10-99 body")
    check_eq(g.get("ContentRange"), "bytes 10-99/1024", "range bytes=10-99 Content-Range")
    check_eq(g["ContentLength"], 90, "range bytes=10-99 ContentLength")
    g = s3.get_object(Bucket=BUCKET, Key="one-kib", Range="bytes=-100")
    check_bytes(g["Body"].read(), data[-100:], "suffix range bytes=-100 body")
    check_eq(g.get("ContentRange"), "bytes 924-1023/1024", "suffix range Content-Range")
    g = s3.get_object(Bucket=BUCKET, Key="one-kib", Range="bytes=1000-")
    check_bytes(g["Body"].read(), data[1000:], "open range bytes=1000- body")
    g = s3.get_object(Bucket=BUCKET, Key="one-kib", Range="bytes=1000-5000")
    check_bytes(g["Body"].read(), data[1000:], "range bytes=1000-5000 (end past the object) body")
    big = objects["five-mib"]
    g = s3.get_object(Bucket=BUCKET, Key="five-mib", Range=f"bytes={MiB - 7}-{3 * MiB + 5}")
    check_bytes(g["Body"].read(), big[MiB - 7 : 3 * MiB + 6], "range across 1 MiB boundaries of five-mib")
    expect_error(
        lambda: s3.get_object(Bucket=BUCKET, Key="one-kib", Range="bytes=2000-3000"),
        "InvalidRange",
        416,
        "range past the end (bytes=2000-3000 of 1024 B)",
    )
    expect_error(
        lambda: s3.get_object(Bucket=BUCKET, Key="one-kib", Range="bytes=1024-"),
        "InvalidRange",
        416,
        "range starting at the size (bytes=1024- of 1024 B)",
    )


def step_head():
    for name, data in objects.items():
        h = s3.head_object(Bucket=BUCKET, Key=name)
        check_eq(h["ContentLength"], len(data), f"head_object {name} ContentLength")
        check_eq(h.get("ETag"), quoted_md5(data), f"head_object {name} ETag")
    head_absent("no-such-key", "head_object of a missing key")
    expect_error(
        lambda: s3.get_object(Bucket=BUCKET, Key="no-such-key"), "NoSuchKey", 404, "get_object of a missing key"
    )
    expect_error(
        lambda: s3.get_object(Bucket="no-such-bucket-x", Key="k"), "NoSuchBucket", 404, "get_object in a missing bucket"
    )


LIST_KEYS = ["ls/a", "ls/b", "ls/sub/c", "ls/sub/d", "ls/z"]


def step_list():
    for k in LIST_KEYS:
        s3.put_object(Bucket=BUCKET, Key=k, Body=k.encode())
    r = s3.list_objects_v2(Bucket=BUCKET, Prefix="ls/", Delimiter="/")
    keys = [o["Key"] for o in r.get("Contents", [])]
    prefixes = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
    check_eq(keys, ["ls/a", "ls/b", "ls/z"], "list_objects_v2 Prefix=ls/ Delimiter=/ keys")
    check_eq(prefixes, ["ls/sub/"], "list_objects_v2 Prefix=ls/ Delimiter=/ CommonPrefixes")
    check_eq(r.get("KeyCount"), 4, "list_objects_v2 Prefix=ls/ Delimiter=/ KeyCount (keys + prefixes)")
    check_eq(r.get("IsTruncated"), False, "list_objects_v2 Prefix=ls/ Delimiter=/ IsTruncated")
    sizes = {o["Key"]: o["Size"] for o in r.get("Contents", [])}
    check_eq(sizes.get("ls/a"), 4, "list_objects_v2 Size of ls/a")
    etags = {o["Key"]: o.get("ETag") for o in r.get("Contents", [])}
    check_eq(etags.get("ls/a"), quoted_md5(b"ls/a"), "list_objects_v2 ETag of ls/a")

    seen, pages, token = [], 0, None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": "ls/", "MaxKeys": 2}
        if token:
            kw["ContinuationToken"] = token
        r = s3.list_objects_v2(**kw)
        pages += 1
        page = [o["Key"] for o in r.get("Contents", [])]
        check(len(page) <= 2, f"list_objects_v2 MaxKeys=2 page {pages} size", "<= 2 keys", page)
        seen += page
        if not r.get("IsTruncated"):
            break
        token = r.get("NextContinuationToken")
        check(token, f"list_objects_v2 page {pages}: IsTruncated without NextContinuationToken", "a token", r)
        check(pages < 10, "list_objects_v2 pagination does not end", "<= 3 pages", seen)
    check_eq(seen, LIST_KEYS, "list_objects_v2 MaxKeys=2 paginated keys")
    check_eq(pages, 3, "list_objects_v2 MaxKeys=2 page count for 5 keys")

    r = s3.list_objects_v2(Bucket=BUCKET, Prefix="ls/", StartAfter="ls/b")
    check_eq([o["Key"] for o in r.get("Contents", [])], LIST_KEYS[2:], "list_objects_v2 StartAfter=ls/b")

    r = s3.list_objects_v2(Bucket=BUCKET, Prefix="nothing-here/")
    check_eq(r.get("KeyCount"), 0, "list_objects_v2 of an empty prefix KeyCount")
    check_eq(r.get("Contents", []), [], "list_objects_v2 of an empty prefix Contents")

    # Version 1.
    r = s3.list_objects(Bucket=BUCKET, Prefix="ls/", Delimiter="/")
    check_eq([o["Key"] for o in r.get("Contents", [])], ["ls/a", "ls/b", "ls/z"], "list_objects (v1) delimiter keys")
    check_eq([p["Prefix"] for p in r.get("CommonPrefixes", [])], ["ls/sub/"], "list_objects (v1) CommonPrefixes")
    seen, marker = [], ""
    for _ in range(10):
        r = s3.list_objects(Bucket=BUCKET, Prefix="ls/", MaxKeys=2, Marker=marker)
        page = [o["Key"] for o in r.get("Contents", [])]
        seen += page
        if not r.get("IsTruncated"):
            break
        check(page, "list_objects (v1) truncated page without keys", "keys", r)
        marker = r.get("NextMarker") or page[-1]
    check_eq(seen, LIST_KEYS, "list_objects (v1) MaxKeys=2 paginated with Marker")


def step_copy():
    data = objects["five-mib"]
    r = s3.copy_object(Bucket=BUCKET, Key="copy-of-five", CopySource={"Bucket": BUCKET, "Key": "five-mib"})
    check_eq(r.get("CopyObjectResult", {}).get("ETag"), quoted_md5(data), "copy_object result ETag")
    check_bytes(s3.get_object(Bucket=BUCKET, Key="copy-of-five")["Body"].read(), data, "get_object of the copy")
    check_eq(s3.head_object(Bucket=BUCKET, Key="copy-of-five").get("ETag"), quoted_md5(data), "head_object copy ETag")
    expect_error(
        lambda: s3.copy_object(Bucket=BUCKET, Key="copy-x", CopySource={"Bucket": BUCKET, "Key": "no-such-key"}),
        "NoSuchKey",
        404,
        "copy_object of a missing source",
    )


def step_delete():
    s3.put_object(Bucket=BUCKET, Key="to-delete", Body=b"bye")
    r = s3.delete_object(Bucket=BUCKET, Key="to-delete")
    check_eq(r["ResponseMetadata"]["HTTPStatusCode"], 204, "delete_object status")
    head_absent("to-delete", "head_object after delete_object")
    r = s3.delete_object(Bucket=BUCKET, Key="never-existed")
    check_eq(r["ResponseMetadata"]["HTTPStatusCode"], 204, "delete_object of a missing key status")

    keys = ["multi/1", "multi/2", "multi/3"]
    for k in keys:
        s3.put_object(Bucket=BUCKET, Key=k, Body=k.encode())
    r = s3.delete_objects(
        Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys + ["multi/missing"]], "Quiet": False}
    )
    check_eq(r.get("Errors", []), [], "delete_objects Errors")
    check_eq(
        sorted(d["Key"] for d in r.get("Deleted", [])), sorted(keys + ["multi/missing"]), "delete_objects Deleted keys"
    )
    left = s3.list_objects_v2(Bucket=BUCKET, Prefix="multi/").get("Contents", [])
    check_eq([o["Key"] for o in left], [], "list_objects_v2 after delete_objects")
    for k in keys:
        head_absent(k, f"head_object {k} after delete_objects")


def step_multipart_transfer():
    data = os.urandom(100 * MiB)
    parts = [data[i : i + 8 * MiB] for i in range(0, len(data), 8 * MiB)]
    expected = multipart_etag(parts)
    check(expected.endswith('-13"'), "test self-check: 13 parts", '-13"', expected)
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
    t = time.monotonic()
    s3.upload_fileobj(io.BytesIO(data), BUCKET, "big/100mib", Config=config)
    print(f"  upload_fileobj 100 MiB: {time.monotonic() - t:.1f} s", flush=True)
    h = s3.head_object(Bucket=BUCKET, Key="big/100mib")
    check_eq(h["ContentLength"], len(data), "head_object of the 100 MiB multipart object ContentLength")
    check_eq(h.get("ETag"), expected, "head_object of the 100 MiB multipart object ETag (md5 of part md5s + -13)")
    t = time.monotonic()
    g = s3.get_object(Bucket=BUCKET, Key="big/100mib")
    check_eq(g.get("ETag"), expected, "get_object 100 MiB ETag")
    check_bytes(g["Body"].read(), data, "get_object of the 100 MiB multipart object")
    print(f"  get_object 100 MiB: {time.monotonic() - t:.1f} s", flush=True)
    g = s3.get_object(Bucket=BUCKET, Key="big/100mib", Range=f"bytes={8 * MiB - 10}-{8 * MiB + 9}")
    check_bytes(g["Body"].read(), data[8 * MiB - 10 : 8 * MiB + 10], "range across the part 1/2 boundary")
    g = s3.get_object(Bucket=BUCKET, Key="big/100mib", Range="bytes=-5")
    check_bytes(g["Body"].read(), data[-5:], "suffix range of the multipart object")
    if s3_read is not None:
        t = time.monotonic()
        out = io.BytesIO()
        s3_read.download_fileobj(BUCKET, "big/100mib", out, Config=config)
        check_bytes(out.getvalue(), data, "download_fileobj (ranged gets) of the 100 MiB object via another member")
        print(f"  download_fileobj 100 MiB via another member: {time.monotonic() - t:.1f} s", flush=True)
    s3.delete_object(Bucket=BUCKET, Key="big/100mib")
    head_absent("big/100mib", "head_object after deleting the 100 MiB object")


def step_multipart_manual():
    key = "mp/manual"
    p1, p2, p3 = os.urandom(5 * MiB), os.urandom(100 * 1024), os.urandom(1024)
    up = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    etags = {}
    for n, p in [(1, p1), (2, p2), (3, p3)]:
        r = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=n, Body=p)
        check_eq(r.get("ETag"), quoted_md5(p), f"upload_part {n} ETag")
        etags[n] = r.get("ETag")
    r = s3.list_parts(Bucket=BUCKET, Key=key, UploadId=up)
    got = [(p["PartNumber"], p["Size"], p["ETag"]) for p in r.get("Parts", [])]
    want = [(1, len(p1), quoted_md5(p1)), (2, len(p2), quoted_md5(p2)), (3, len(p3), quoted_md5(p3))]
    check_eq(got, want, "list_parts (PartNumber, Size, ETag)")
    check_eq(r.get("UploadId"), up, "list_parts UploadId")
    # A part uploaded again replaces the earlier one.
    p3 = os.urandom(2048)
    etags[3] = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=3, Body=p3).get("ETag")
    got = [(p["PartNumber"], p["Size"]) for p in s3.list_parts(Bucket=BUCKET, Key=key, UploadId=up).get("Parts", [])]
    check_eq(got, [(1, len(p1)), (2, len(p2)), (3, len(p3))], "list_parts after part 3 was uploaded again")
    r = s3.list_parts(Bucket=BUCKET, Key=key, UploadId=up, MaxParts=2)
    check_eq([p["PartNumber"] for p in r.get("Parts", [])], [1, 2], "list_parts MaxParts=2")
    check_eq(r.get("IsTruncated"), True, "list_parts MaxParts=2 IsTruncated")
    if r.get("IsTruncated"):
        r = s3.list_parts(Bucket=BUCKET, Key=key, UploadId=up, PartNumberMarker=r.get("NextPartNumberMarker"))
        check_eq([p["PartNumber"] for p in r.get("Parts", [])], [3], "list_parts after NextPartNumberMarker")

    def complete(parts):
        return s3.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]}
        )

    expect_error(lambda: complete([(2, etags[2]), (1, etags[1])]), "InvalidPartOrder", 400, "complete with parts 2,1")
    expect_error(lambda: complete([(1, quoted_md5(b"other"))]), "InvalidPart", 400, "complete with a wrong part ETag")
    expect_error(lambda: complete([(1, etags[1]), (4, etags[3])]), "InvalidPart", 400, "complete with a missing part 4")
    expect_error(
        lambda: complete([(1, etags[1]), (2, etags[2]), (3, etags[3])]),
        "EntityTooSmall",
        400,
        "complete with a 100 KiB part 2 that is not the last",
    )
    head_absent(key, "head_object while the upload is not completed")
    # The failed completions left the upload as it was: it can still be listed and aborted.
    got = [p["PartNumber"] for p in s3.list_parts(Bucket=BUCKET, Key=key, UploadId=up).get("Parts", [])]
    check_eq(got, [1, 2, 3], "list_parts after failed completions")
    s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up)
    expect_error(
        lambda: s3.list_parts(Bucket=BUCKET, Key=key, UploadId=up), "NoSuchUpload", 404, "list_parts after abort"
    )
    expect_error(
        lambda: s3.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=4, Body=b"x"),
        "NoSuchUpload",
        404,
        "upload_part after abort",
    )
    expect_error(lambda: complete([(1, etags[1])]), "NoSuchUpload", 404, "complete_multipart_upload after abort")
    expect_error(
        lambda: s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up), "NoSuchUpload", 404, "abort twice"
    )
    head_absent(key, "head_object after abort")

    # A completed upload of a 5 MiB part and a 1 KiB last part; parts 1 and 3 (gaps are allowed).
    up = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    e1 = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=1, Body=p1)["ETag"]
    e3 = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=3, Body=p3)["ETag"]
    r = complete([(1, e1), (3, e3)])
    expected = multipart_etag([p1, p3])
    check_eq(r.get("ETag"), expected, "complete_multipart_upload ETag (md5 of part md5s + -2)")
    g = s3.get_object(Bucket=BUCKET, Key=key)
    check_bytes(g["Body"].read(), p1 + p3, "get_object of the completed manual upload")
    check_eq(g.get("ETag"), expected, "get_object ETag of the completed manual upload")
    expect_error(
        lambda: s3.list_parts(Bucket=BUCKET, Key=key, UploadId=up), "NoSuchUpload", 404, "list_parts after complete"
    )
    s3.delete_object(Bucket=BUCKET, Key=key)


def step_checksums():
    data = os.urandom(64 * 1024)
    wrong_md5 = b64(hashlib.md5(b"something else").digest())
    code = expect_error(
        lambda: s3.put_object(Bucket=BUCKET, Key="bad-md5", Body=data, ContentMD5=wrong_md5),
        "BadDigest",
        400,
        "put_object with a wrong Content-MD5",
    )
    head_absent("bad-md5", f"head_object after the put with a wrong Content-MD5 failed ({code})")
    wrong_crc = b64((zlib.crc32(data) ^ 1).to_bytes(4, "big"))
    expect_error(
        lambda: s3.put_object(Bucket=BUCKET, Key="bad-crc32", Body=data, ChecksumCRC32=wrong_crc),
        "BadDigest",
        400,
        "put_object with a wrong ChecksumCRC32",
    )
    head_absent("bad-crc32", "head_object after the put with a wrong ChecksumCRC32 failed")
    wrong_sha256 = b64(hashlib.sha256(b"something else").digest())
    expect_error(
        lambda: s3.put_object(Bucket=BUCKET, Key="bad-sha256", Body=data, ChecksumSHA256=wrong_sha256),
        "BadDigest",
        400,
        "put_object with a wrong ChecksumSHA256",
    )
    head_absent("bad-sha256", "head_object after the put with a wrong ChecksumSHA256 failed")
    # Right ones are accepted.
    s3.put_object(Bucket=BUCKET, Key="good-md5", Body=data, ContentMD5=b64(hashlib.md5(data).digest()))
    s3.put_object(Bucket=BUCKET, Key="good-crc32", Body=data, ChecksumCRC32=crc32_b64(data))
    s3.put_object(Bucket=BUCKET, Key="good-sha1", Body=data, ChecksumSHA1=b64(hashlib.sha1(data).digest()))
    s3.put_object(Bucket=BUCKET, Key="good-sha256", Body=data, ChecksumAlgorithm="SHA256")
    for k in ["good-md5", "good-crc32", "good-sha1", "good-sha256"]:
        check_bytes(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read(), data, f"get_object {k}")
        s3.delete_object(Bucket=BUCKET, Key=k)


# ----- requests signed here (what boto3 does not send over plain http) -----


def signed_request(method, key, body=b"", headers=None, payload_hash=None, secret=SECRET):
    """A SigV4-signed request for BUCKET/key; returns (status, headers, body)."""
    u = urllib.parse.urlparse(ENDPOINT)
    path = "/" + BUCKET + "/" + urllib.parse.quote(key, safe="/-_.~")
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    h = {k.lower(): str(v) for k, v in (headers or {}).items()}
    h["host"] = u.netloc
    h["x-amz-date"] = amz_date
    h["x-amz-content-sha256"] = payload_hash or hashlib.sha256(body).hexdigest()
    signed = sorted(h)
    canonical = "\n".join(
        [
            method,
            path,
            "",
            "".join(f"{k}:{' '.join(h[k].split())}\n" for k in signed),
            ";".join(signed),
            h["x-amz-content-sha256"],
        ]
    )
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in [day, REGION, "s3", "aws4_request"]:
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    h["authorization"] = f"AWS4-HMAC-SHA256 Credential={KEY_ID}/{scope}, SignedHeaders={';'.join(signed)}, Signature={sig}"
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def aws_chunked(data, trailer_name, trailer_value, chunk=16 * 1024):
    out = bytearray()
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    out += b"0\r\n" + f"{trailer_name}:{trailer_value}\r\n".encode() + b"\r\n"
    return bytes(out)


def put_trailer(key, data, name, value):
    return signed_request(
        "PUT",
        key,
        body=aws_chunked(data, name, value),
        payload_hash="STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        headers={
            "content-encoding": "aws-chunked",
            "x-amz-decoded-content-length": len(data),
            "x-amz-trailer": name,
        },
    )


def expect_status(result, status, code, what):
    got_status, _, body = result
    text = body.decode(errors="replace")
    check(
        got_status == status and (code is None or f"<Code>{code}</Code>" in text),
        what,
        f"{status} {code or ''}",
        f"{got_status} {text[:300]}",
    )


def step_raw_checksums():
    data = os.urandom(100 * 1024 + 7)
    # aws-chunked with an unsigned trailer, as SDKs send over https.
    expect_status(
        put_trailer("trailer-crc32", data, "x-amz-checksum-crc32", crc32_b64(data)), 200, None, "trailer CRC32 put"
    )
    check_bytes(s3.get_object(Bucket=BUCKET, Key="trailer-crc32")["Body"].read(), data, "get after trailer CRC32 put")
    check_eq(s3.head_object(Bucket=BUCKET, Key="trailer-crc32").get("ETag"), quoted_md5(data), "trailer put ETag")
    expect_status(
        put_trailer("trailer-crc32c", data, "x-amz-checksum-crc32c", crc32c_b64(data)), 200, None, "trailer CRC32C put"
    )
    check_bytes(s3.get_object(Bucket=BUCKET, Key="trailer-crc32c")["Body"].read(), data, "get after trailer CRC32C put")
    expect_status(
        put_trailer("trailer-sha256", data, "x-amz-checksum-sha256", b64(hashlib.sha256(data).digest())),
        200,
        None,
        "trailer SHA256 put",
    )
    wrong = b64((zlib.crc32(data) ^ 0x100).to_bytes(4, "big"))
    expect_status(put_trailer("trailer-bad", data, "x-amz-checksum-crc32", wrong), 400, "BadDigest", "trailer wrong CRC32")
    head_absent("trailer-bad", "head_object after the trailer put with a wrong CRC32")
    expect_status(
        put_trailer("trailer-bad-c", data, "x-amz-checksum-crc32c", crc32c_b64(data + b"x")),
        400,
        "BadDigest",
        "trailer wrong CRC32C",
    )
    head_absent("trailer-bad-c", "head_object after the trailer put with a wrong CRC32C")
    # Checksum headers with a signed payload.
    expect_status(
        signed_request("PUT", "hdr-crc32c", body=data, headers={"x-amz-checksum-crc32c": crc32c_b64(data)}),
        200,
        None,
        "put with a right x-amz-checksum-crc32c header",
    )
    expect_status(
        signed_request("PUT", "hdr-bad-crc32c", body=data, headers={"x-amz-checksum-crc32c": crc32c_b64(b"x")}),
        400,
        "BadDigest",
        "put with a wrong x-amz-checksum-crc32c header",
    )
    head_absent("hdr-bad-crc32c", "head_object after the put with a wrong CRC32C header")
    expect_status(
        signed_request("PUT", "hdr-bad-sha1", body=data, headers={"x-amz-checksum-sha1": b64(hashlib.sha1(b"x").digest())}),
        400,
        "BadDigest",
        "put with a wrong x-amz-checksum-sha1 header",
    )
    head_absent("hdr-bad-sha1", "head_object after the put with a wrong SHA1 header")
    # UNSIGNED-PAYLOAD, and a payload that does not match its signed SHA-256.
    expect_status(
        signed_request("PUT", "unsigned-payload", body=data, payload_hash="UNSIGNED-PAYLOAD"),
        200,
        None,
        "put with UNSIGNED-PAYLOAD",
    )
    check_bytes(s3.get_object(Bucket=BUCKET, Key="unsigned-payload")["Body"].read(), data, "get after UNSIGNED-PAYLOAD")
    result = signed_request("PUT", "sha-mismatch", body=data, payload_hash=hashlib.sha256(b"x").hexdigest())
    expect_status(result, 400, None, "put whose body does not match x-amz-content-sha256")
    head_absent("sha-mismatch", "head_object after the put with a mismatched x-amz-content-sha256")
    for k in ["trailer-crc32", "trailer-crc32c", "trailer-sha256", "hdr-crc32c", "unsigned-payload"]:
        s3.delete_object(Bucket=BUCKET, Key=k)


def step_auth():
    bad = client(secret=SECRET + "x")
    expect_error(lambda: bad.list_buckets(), "SignatureDoesNotMatch", 403, "list_buckets with a wrong secret")
    expect_error(
        lambda: bad.put_object(Bucket=BUCKET, Key="wrong-secret", Body=b"x"),
        "SignatureDoesNotMatch",
        403,
        "put_object with a wrong secret",
    )
    head_absent("wrong-secret", "head_object after the put with a wrong secret")
    code = expect_error(
        lambda: client(key="AKNOSUCHKEY000000000").list_buckets(), None, 403, "list_buckets with an unknown key id"
    )
    print(f"  unknown access key id -> {code}", flush=True)
    anon = client(signed=False)
    expect_error(lambda: anon.list_buckets(), "AccessDenied", 403, "anonymous list_buckets")
    expect_error(lambda: anon.get_object(Bucket=BUCKET, Key="one-kib"), "AccessDenied", 403, "anonymous get_object")
    expect_error(
        lambda: anon.put_object(Bucket=BUCKET, Key="anon", Body=b"x"), "AccessDenied", 403, "anonymous put_object"
    )
    head_absent("anon", "head_object after the anonymous put")


def step_delete_bucket():
    expect_error(lambda: s3.delete_bucket(Bucket=BUCKET), "BucketNotEmpty", 409, "delete_bucket of a non-empty bucket")
    s3.head_bucket(Bucket=BUCKET)
    keys, token = [], None
    while True:
        kw = {"Bucket": BUCKET}
        if token:
            kw["ContinuationToken"] = token
        r = s3.list_objects_v2(**kw)
        keys += [o["Key"] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            break
        token = r["NextContinuationToken"]
    for i in range(0, len(keys), 1000):
        r = s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
        check_eq(r.get("Errors", []), [], "delete_objects (Quiet) Errors")
    r = s3.delete_bucket(Bucket=BUCKET)
    check_eq(r["ResponseMetadata"]["HTTPStatusCode"], 204, "delete_bucket status")
    expect_error(lambda: s3.head_bucket(Bucket=BUCKET), "404", 404, "head_bucket after delete_bucket")
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    check(BUCKET not in names, "list_buckets after delete_bucket", f"{BUCKET} not listed", names)
    expect_error(lambda: s3.delete_bucket(Bucket=BUCKET), "NoSuchBucket", 404, "delete_bucket of a missing bucket")


STEPS = [
    ("buckets", step_buckets, True),
    ("put_get", step_put_get, False),
    ("range", step_range, False),
    ("head", step_head, False),
    ("list", step_list, False),
    ("copy", step_copy, False),
    ("delete", step_delete, False),
    ("multipart_transfer", step_multipart_transfer, False),
    ("multipart_manual", step_multipart_manual, False),
    ("checksums", step_checksums, False),
    ("raw_checksums", step_raw_checksums, False),
    ("auth", step_auth, False),
    ("delete_bucket", step_delete_bucket, False),
]


def main():
    print(f"boto3 {boto3.__version__} botocore {botocore.__version__}, checksums {MODE}, endpoint {ENDPOINT}", flush=True)
    for name, fn, essential in STEPS:
        t = time.monotonic()
        try:
            fn()
            print(f"ok   {name} ({time.monotonic() - t:.1f} s)", flush=True)
        except CheckFailed as e:
            failures.append(f"{name}: {e}")
            print(f"FAIL {name}: {e}", flush=True)
        except Exception as e:  # an unexpected error answer or exception
            detail = traceback.format_exc(limit=4)
            failures.append(f"{name}: {type(e).__name__}: {e}")
            print(f"FAIL {name}: unexpected {type(e).__name__}: {e}\n{detail}", flush=True)
        if essential and failures:
            print("an essential step failed; stopping", flush=True)
            break
    for s in server_errors:
        print(f"note: an attempt failed (botocore retried it): {s}", flush=True)
    if failures:
        print(f"\n{len(failures)} step(s) failed ({MODE}):", flush=True)
        for f in failures:
            print(f"  - {f}", flush=True)
        sys.exit(1)
    print(f"all {len(STEPS)} steps passed ({MODE})", flush=True)


if __name__ == "__main__":
    main()
