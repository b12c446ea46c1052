//! The S3-compatible HTTP API on `--listen-s3-urls` (off by default), over the
//! blob service ([`super::blob`]).
//!
//! The `s3s` crate does the protocol: HTTP routing (path-style), XML, SigV4
//! (headers, presigned URLs, aws-chunked bodies and their signatures). This
//! module maps each operation to the blob service and adds what s3s leaves to
//! the implementation:
//! - Every request is signed with an access key made by `concord blob keys
//!   create` (kept in the blob store's keys group); anonymous requests are refused.
//! - A client's Content-MD5 and `x-amz-checksum-*` values (headers, or
//!   trailers of an aws-chunked body, as boto3 ≥ 1.36 sends by default) are
//!   checked after the bytes are in and before the object or part is
//!   committed: a mismatch is `BadDigest` and stores nothing.
//! - ETags: the hex MD5 of a single-part object; MD5 of the parts' MD5s and
//!   `-N` for a multipart one.
//! - Connections are bounded by `--s3-max-connections`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use futures::StreamExt;
use md5::Digest as _;
use s3s::dto::*;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};

use super::blob::{BlobService, Check, Failure, MetaAnswer, Source};
use crate::streams::bucket::{BlobError, ObjectRecord};

/// Most keys one listing returns (S3's limit).
const MAX_LIST_KEYS: usize = 1000;

/// Most bytes of a refused upload's body read and dropped before the error
/// is answered: a client reuses its connection only when the body it sent was
/// read (larger ones are cut off with the connection).
const MAX_DRAIN_BYTES: u64 = 64 << 20;

/// Most parts one ListParts returns (S3's limit).
const MAX_LIST_PARTS: usize = 1000;

fn s3_err(f: Failure) -> S3Error {
    match f {
        Failure::Refused(e) => {
            let code = match e {
                BlobError::NoSuchBucket => S3ErrorCode::NoSuchBucket,
                BlobError::NoSuchKey => S3ErrorCode::NoSuchKey,
                BlobError::BucketExists => S3ErrorCode::BucketAlreadyOwnedByYou,
                BlobError::BucketNotEmpty => S3ErrorCode::BucketNotEmpty,
                BlobError::NoSuchUpload => S3ErrorCode::NoSuchUpload,
                BlobError::InvalidPart => S3ErrorCode::InvalidPart,
                BlobError::InvalidPartOrder => S3ErrorCode::InvalidPartOrder,
                BlobError::EntityTooSmall => S3ErrorCode::EntityTooSmall,
                BlobError::PutTooSlow | BlobError::Unplaced => S3ErrorCode::SlowDown,
                BlobError::KeyExists | BlobError::NoSuchAccessKey => S3ErrorCode::InternalError,
            };
            S3Error::with_message(code, e.to_string())
        }
        Failure::Invalid(m) => S3Error::with_message(S3ErrorCode::InvalidArgument, m),
        Failure::InvalidRange(m) => S3Error::with_message(S3ErrorCode::InvalidRange, m),
        Failure::BadDigest(m) => S3Error::with_message(S3ErrorCode::BadDigest, m),
        Failure::Unavailable(m) => S3Error::with_message(S3ErrorCode::ServiceUnavailable, m),
        Failure::Internal(m) => S3Error::with_message(S3ErrorCode::InternalError, m),
    }
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp::from(SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
}

fn etag(quoted: &str) -> ETag {
    ETag::Strong(quoted.trim_matches('"').to_string())
}

fn metadata_of(map: Option<Metadata>) -> Vec<(String, String)> {
    map.map(|m| m.into_iter().collect()).unwrap_or_default()
}

fn metadata_map(o: &ObjectRecord) -> Option<Metadata> {
    (!o.metadata.is_empty()).then(|| o.metadata.iter().cloned().collect())
}

/// The checks a client asked for on an upload's bytes: Content-MD5 and the
/// `x-amz-checksum-*` values (from headers, or trailers read once the body ends).
struct Checksums {
    want: Checksum,
    content_md5: Option<Vec<u8>>,
    hasher: Arc<Mutex<(s3s::checksum::ChecksumHasher, Option<md5::Md5>)>>,
    trailers: Option<s3s::TrailingHeaders>,
}

impl Checksums {
    fn new(
        want: Checksum,
        algorithm: Option<&ChecksumAlgorithm>,
        content_md5: Option<&str>,
        headers: &http::HeaderMap,
        trailers: Option<s3s::TrailingHeaders>,
    ) -> S3Result<Checksums> {
        let content_md5 = match content_md5 {
            None => None,
            Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(d) if d.len() == 16 => Some(d),
                _ => return Err(s3_error!(InvalidDigest, "The Content-MD5 you specified was an invalid.")),
            },
        };
        let announced: Vec<String> = headers
            .get_all("x-amz-trailer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
            .collect();
        let asked = |name: &str, have: bool| {
            have || algorithm.is_some_and(|a| a.as_str().eq_ignore_ascii_case(name))
                || announced.iter().any(|t| *t == format!("x-amz-checksum-{}", name.to_ascii_lowercase()))
        };
        let mut hasher = s3s::checksum::ChecksumHasher::default();
        if asked(ChecksumAlgorithm::CRC32, want.checksum_crc32.is_some()) {
            hasher.crc32 = Some(Default::default());
        }
        if asked(ChecksumAlgorithm::CRC32C, want.checksum_crc32c.is_some()) {
            hasher.crc32c = Some(Default::default());
        }
        if asked(ChecksumAlgorithm::SHA1, want.checksum_sha1.is_some()) {
            hasher.sha1 = Some(Default::default());
        }
        if asked(ChecksumAlgorithm::SHA256, want.checksum_sha256.is_some()) {
            hasher.sha256 = Some(Default::default());
        }
        if asked(ChecksumAlgorithm::CRC64NVME, want.checksum_crc64nvme.is_some()) {
            hasher.crc64nvme = Some(Default::default());
        }
        let md5 = content_md5.is_some().then(md5::Md5::new);
        Ok(Checksums { want, content_md5, hasher: Arc::new(Mutex::new((hasher, md5))), trailers })
    }

    /// `body` as a source that feeds the hashers.
    fn source(&self, body: Option<StreamingBlob>) -> Source<'static> {
        let hasher = self.hasher.clone();
        match body {
            None => Box::pin(futures::stream::empty()),
            Some(body) => Box::pin(body.map(move |piece| match piece {
                Ok(bytes) => {
                    let mut h = hasher.lock().expect("checksum hasher poisoned");
                    h.0.update(&bytes);
                    if let Some(m) = &mut h.1 {
                        m.update(&bytes);
                    }
                    Ok(bytes.to_vec())
                }
                Err(e) => Err(Failure::Invalid(format!("the request body could not be read: {e}"))),
            })),
        }
    }

    /// The check to run once the bytes are in.
    fn check(self) -> Check<'static> {
        Box::new(move || {
            let (hasher, md5) = std::mem::take(&mut *self.hasher.lock().expect("checksum hasher poisoned"));
            if let (Some(want), Some(md5)) = (&self.content_md5, md5) {
                if md5.finalize().as_slice() != want.as_slice() {
                    return Err(Failure::BadDigest(
                        "The Content-MD5 you specified did not match what we received.".into(),
                    ));
                }
            }
            let mut want = self.want;
            if let Some(trailers) = self.trailers.as_ref().and_then(|t| t.take()) {
                let value = |name: &str| trailers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                want.checksum_crc32 = want.checksum_crc32.or(value("x-amz-checksum-crc32"));
                want.checksum_crc32c = want.checksum_crc32c.or(value("x-amz-checksum-crc32c"));
                want.checksum_sha1 = want.checksum_sha1.or(value("x-amz-checksum-sha1"));
                want.checksum_sha256 = want.checksum_sha256.or(value("x-amz-checksum-sha256"));
                want.checksum_crc64nvme = want.checksum_crc64nvme.or(value("x-amz-checksum-crc64nvme"));
            }
            let got = hasher.finalize();
            for (name, want, got) in [
                ("CRC32", &want.checksum_crc32, &got.checksum_crc32),
                ("CRC32C", &want.checksum_crc32c, &got.checksum_crc32c),
                ("SHA1", &want.checksum_sha1, &got.checksum_sha1),
                ("SHA256", &want.checksum_sha256, &got.checksum_sha256),
                ("CRC64NVME", &want.checksum_crc64nvme, &got.checksum_crc64nvme),
            ] {
                if let Some(want) = want {
                    if got.as_ref() != Some(want) {
                        return Err(Failure::BadDigest(format!(
                            "The {name} you specified did not match the calculated checksum."
                        )));
                    }
                }
            }
            Ok(())
        })
    }
}

/// SigV4 secrets: the access keys in the blob store.
pub struct KeyStore(pub Arc<BlobService>);

#[async_trait::async_trait]
impl s3s::auth::S3Auth for KeyStore {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<s3s::auth::SecretKey> {
        match self.0.key_secret(access_key).await.map_err(s3_err)? {
            Some(secret) => Ok(secret.into()),
            None => Err(s3_error!(InvalidAccessKeyId)),
        }
    }
}

/// The S3 operations over the blob service.
pub struct S3Api(pub Arc<BlobService>);

/// Reads and drops up to [`MAX_DRAIN_BYTES`] of `body` (see there).
async fn drain(body: Option<StreamingBlob>) {
    let Some(mut body) = body else { return };
    let mut read = 0u64;
    while let Some(Ok(piece)) = body.next().await {
        read += piece.len() as u64;
        if read > MAX_DRAIN_BYTES {
            return;
        }
    }
}

impl S3Api {
    fn object_list(&self, objects: &[(String, ObjectRecord)]) -> Vec<Object> {
        objects
            .iter()
            .map(|(k, o)| Object {
                key: Some(k.clone()),
                size: Some(o.size as i64),
                e_tag: Some(etag(&o.etag)),
                last_modified: Some(timestamp(o.modified_ms)),
                storage_class: Some(ObjectStorageClass::from_static(ObjectStorageClass::STANDARD)),
                ..Default::default()
            })
            .collect()
    }

    async fn listing(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: &str,
        after: &str,
        max_keys: Option<i32>,
    ) -> S3Result<(Vec<(String, ObjectRecord)>, Vec<String>, bool, Option<String>, usize)> {
        let max = max_keys.map_or(MAX_LIST_KEYS, |m| (m.max(0) as usize).min(MAX_LIST_KEYS));
        let answer = self
            .0
            .list(bucket, prefix.to_string(), delimiter.to_string(), after.to_string(), max)
            .await
            .map_err(s3_err)?;
        match answer {
            MetaAnswer::List { objects, common_prefixes, truncated, last } => {
                Ok((objects, common_prefixes, truncated, last, max))
            }
            other => Err(s3_error!(InternalError, "a listing answered {other:?}")),
        }
    }
}

#[async_trait::async_trait]
impl S3 for S3Api {
    async fn list_buckets(&self, _req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        let buckets = self.0.list_buckets().await.map_err(s3_err)?;
        let buckets = buckets
            .into_iter()
            .map(|b| Bucket { name: Some(b.name), creation_date: Some(timestamp(b.created_ms)), ..Default::default() })
            .collect();
        let owner = Owner { display_name: Some("concord".into()), id: Some("concord".into()) };
        Ok(S3Response::new(ListBucketsOutput { buckets: Some(buckets), owner: Some(owner), ..Default::default() }))
    }

    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        let name = req.input.bucket;
        self.0.create_bucket(&name).await.map_err(s3_err)?;
        Ok(S3Response::new(CreateBucketOutput { location: Some(format!("/{name}")) }))
    }

    async fn delete_bucket(&self, req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.0.delete_bucket(&req.input.bucket).await.map_err(s3_err)?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        match self.0.meta_read(&req.input.bucket, super::blob::MetaRead::Bucket).await.map_err(s3_err)? {
            MetaAnswer::Bucket(Some(b)) if !b.deleting => Ok(S3Response::new(HeadBucketOutput::default())),
            _ => Err(s3_error!(NoSuchBucket)),
        }
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        match self.0.meta_read(&req.input.bucket, super::blob::MetaRead::Bucket).await.map_err(s3_err)? {
            MetaAnswer::Bucket(Some(b)) if !b.deleting => Ok(S3Response::new(GetBucketLocationOutput::default())),
            _ => Err(s3_error!(NoSuchBucket)),
        }
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let input = req.input;
        let want = Checksum {
            checksum_crc32: input.checksum_crc32,
            checksum_crc32c: input.checksum_crc32c,
            checksum_sha1: input.checksum_sha1,
            checksum_sha256: input.checksum_sha256,
            checksum_crc64nvme: input.checksum_crc64nvme,
            ..Default::default()
        };
        let sums = Checksums::new(
            want,
            input.checksum_algorithm.as_ref(),
            input.content_md5.as_deref(),
            &req.headers,
            req.trailing_headers,
        )?;
        if let Err(e) = self.0.check_live_bucket(&input.bucket).await {
            drain(input.body).await;
            return Err(s3_err(e));
        }
        let source = sums.source(input.body);
        let content_type = input.content_type.unwrap_or_default();
        let metadata = metadata_of(input.metadata);
        let o = self
            .0
            .put_object(&input.bucket, &input.key, content_type, metadata, source, sums.check())
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(PutObjectOutput { e_tag: Some(etag(&o.etag)), ..Default::default() }))
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let head = self.0.head(&input.bucket, &input.key).await.map_err(s3_err)?;
        let range = match &input.range {
            None => None,
            Some(r) => Some(r.check(head.size)?),
        };
        let (offset, length) = match &range {
            Some(r) => (r.start, r.end - r.start),
            None => (0, head.size),
        };
        let (o, rx) = self.0.get_object(&input.bucket, &input.key, offset, Some(length)).await.map_err(s3_err)?;
        if o.etag != head.etag {
            // Replaced between the two reads: the range was checked against another object.
            return Err(s3_error!(ServiceUnavailable, "the object changed while it was read; try again"));
        }
        let body = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|piece| piece.map(bytes::Bytes::from).map_err(|e| std::io::Error::other(format!("{e:?}"))));
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(body)),
            content_length: Some(length as i64),
            content_range: range.map(|r| format!("bytes {}-{}/{}", r.start, r.end - 1, o.size)),
            accept_ranges: Some("bytes".into()),
            content_type: (!o.content_type.is_empty()).then(|| o.content_type.clone()),
            e_tag: Some(etag(&o.etag)),
            last_modified: Some(timestamp(o.modified_ms)),
            metadata: metadata_map(&o),
            ..Default::default()
        }))
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        let o = self.0.head(&req.input.bucket, &req.input.key).await.map_err(s3_err)?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(o.size as i64),
            accept_ranges: Some("bytes".into()),
            content_type: (!o.content_type.is_empty()).then(|| o.content_type.clone()),
            e_tag: Some(etag(&o.etag)),
            last_modified: Some(timestamp(o.modified_ms)),
            metadata: metadata_map(&o),
            ..Default::default()
        }))
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.0.delete(&req.input.bucket, &req.input.key).await.map_err(s3_err)?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        let quiet = input.delete.quiet.unwrap_or(false);
        let (mut deleted, mut errors) = (Vec::new(), Vec::new());
        for o in input.delete.objects {
            match self.0.delete(&input.bucket, &o.key).await {
                Ok(_) => {
                    if !quiet {
                        deleted.push(DeletedObject { key: Some(o.key), ..Default::default() });
                    }
                }
                Err(Failure::Refused(BlobError::NoSuchBucket)) => return Err(s3_error!(NoSuchBucket)),
                Err(f) => {
                    let e = s3_err(f);
                    errors.push(Error {
                        code: Some(e.code().as_str().to_string()),
                        key: Some(o.key),
                        message: e.message().map(str::to_string),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        let input = req.input;
        let CopySource::Bucket { bucket: src_bucket, key: src_key, .. } = &input.copy_source else {
            return Err(s3_error!(NotImplemented, "only bucket/key copy sources are supported"));
        };
        let o = self.0.copy(src_bucket, src_key, &input.bucket, &input.key).await.map_err(s3_err)?;
        let result = CopyObjectResult {
            e_tag: Some(etag(&o.etag)),
            last_modified: Some(timestamp(o.modified_ms)),
            ..Default::default()
        };
        Ok(S3Response::new(CopyObjectOutput { copy_object_result: Some(result), ..Default::default() }))
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().unwrap_or_default();
        let after = match (&input.continuation_token, &input.start_after) {
            (Some(t), _) => t.clone(),
            (None, Some(s)) => s.clone(),
            (None, None) => String::new(),
        };
        let (objects, prefixes, truncated, last, max) =
            self.listing(&input.bucket, &prefix, &delimiter, &after, input.max_keys).await?;
        let key_count = (objects.len() + prefixes.len()) as i32;
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            max_keys: Some(max as i32),
            key_count: Some(key_count),
            continuation_token: input.continuation_token,
            start_after: input.start_after,
            is_truncated: Some(truncated),
            next_continuation_token: if truncated { last } else { None },
            contents: Some(self.object_list(&objects)),
            common_prefixes: Some(prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(p) }).collect()),
            ..Default::default()
        }))
    }

    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().unwrap_or_default();
        let after = input.marker.clone().unwrap_or_default();
        let (objects, prefixes, truncated, last, max) =
            self.listing(&input.bucket, &prefix, &delimiter, &after, input.max_keys).await?;
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            marker: input.marker,
            max_keys: Some(max as i32),
            is_truncated: Some(truncated),
            next_marker: if truncated { last } else { None },
            contents: Some(self.object_list(&objects)),
            common_prefixes: Some(prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(p) }).collect()),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        let content_type = input.content_type.unwrap_or_default();
        let upload_id = self
            .0
            .create_upload(&input.bucket, &input.key, content_type, metadata_of(input.metadata))
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        let input = req.input;
        let want = Checksum {
            checksum_crc32: input.checksum_crc32,
            checksum_crc32c: input.checksum_crc32c,
            checksum_sha1: input.checksum_sha1,
            checksum_sha256: input.checksum_sha256,
            checksum_crc64nvme: input.checksum_crc64nvme,
            ..Default::default()
        };
        let sums = Checksums::new(
            want,
            input.checksum_algorithm.as_ref(),
            input.content_md5.as_deref(),
            &req.headers,
            req.trailing_headers,
        )?;
        let number = u32::try_from(input.part_number).map_err(|_| s3_error!(InvalidArgument, "bad part number"))?;
        let upload = self.0.meta_read(&input.bucket, super::blob::MetaRead::Upload(input.upload_id.clone())).await;
        let refused = match upload {
            Ok(MetaAnswer::Upload(Some(_))) => None,
            Ok(_) => Some(Failure::Refused(BlobError::NoSuchUpload)),
            Err(e) => Some(e),
        };
        if let Some(e) = refused {
            drain(input.body).await;
            return Err(s3_err(e));
        }
        let source = sums.source(input.body);
        let part =
            self.0.upload_part(&input.bucket, &input.upload_id, number, source, sums.check()).await.map_err(s3_err)?;
        Ok(S3Response::new(UploadPartOutput { e_tag: Some(etag(&part.etag())), ..Default::default() }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        let mut parts = Vec::new();
        for p in input.multipart_upload.and_then(|m| m.parts).unwrap_or_default() {
            let (Some(n), Some(tag)) = (p.part_number, p.e_tag) else { return Err(s3_error!(InvalidPart)) };
            let n = u32::try_from(n).map_err(|_| s3_error!(InvalidPart))?;
            parts.push((n, tag.value().to_string()));
        }
        let (key, o) = self.0.complete_upload(&input.bucket, &input.upload_id, parts).await.map_err(s3_err)?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            location: Some(format!("/{}/{key}", input.bucket)),
            bucket: Some(input.bucket),
            key: Some(key),
            e_tag: Some(etag(&o.etag)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.0.abort_upload(&req.input.bucket, &req.input.upload_id).await.map_err(s3_err)?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        let after = input.part_number_marker.and_then(|m| u32::try_from(m).ok()).unwrap_or(0);
        let max = input.max_parts.map_or(MAX_LIST_PARTS, |m| (m.max(0) as usize).min(MAX_LIST_PARTS));
        let (upload, mut parts) =
            self.0.list_parts(&input.bucket, &input.upload_id, after, max + 1).await.map_err(s3_err)?;
        let truncated = parts.len() > max;
        parts.truncate(max);
        let next = parts.last().map(|(n, _)| *n as i32);
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(upload.key),
            upload_id: Some(input.upload_id),
            max_parts: Some(max as i32),
            is_truncated: Some(truncated),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: if truncated { next } else { None },
            parts: Some(
                parts
                    .into_iter()
                    .map(|(n, p)| Part {
                        part_number: Some(n as i32),
                        size: Some(p.size as i64),
                        e_tag: Some(etag(&p.etag())),
                        last_modified: Some(timestamp(p.modified_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }
}

/// Serves the S3 API on `listener` for the member's lifetime, at most
/// `max_connections` connections at once (more wait to be accepted).
pub async fn serve(
    listener: tokio::net::TcpListener,
    blobs: Arc<BlobService>,
    max_connections: usize,
) -> Result<(), String> {
    let mut builder = s3s::service::S3ServiceBuilder::new(S3Api(blobs.clone()));
    builder.set_auth(KeyStore(blobs));
    let service = builder.build();
    let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let permit = slots.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let (socket, _) = listener.accept().await.map_err(|e| format!("s3 listener: {e}"))?;
        let _ = socket.set_nodelay(true);
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone()).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}
