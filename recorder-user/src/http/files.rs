//! Recording files over HTTP: single byte ranges (RFC 9110 §14) so that a browser can seek in
//! a WAV, streamed from the file rather than read into memory.

use std::{io::SeekFrom, ops::Range, path::Path};

use axum::{
    body::Body,
    http::{header, HeaderValue, StatusCode},
    response::Response,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::api::ApiError;

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    /// No (usable) range: the whole file, 200.
    All,
    /// One satisfiable range, 206.
    Part(Range<u64>),
    /// A range that does not overlap the file, 416.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n`. Several ranges, other units and malformed
/// values are ignored (the whole file is sent), as RFC 9110 allows.
pub fn wanted(range: Option<&str>, len: u64) -> Wanted {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return Wanted::All;
    };
    if spec.contains(',') {
        return Wanted::All;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Wanted::All;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    let range = match (first.trim().is_empty(), parse(first), parse(last)) {
        // Suffix: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 {
                return Wanted::Unsatisfiable;
            }
            len.saturating_sub(n)..len
        }
        (false, Some(a), None) if last.trim().is_empty() => a..len,
        (false, Some(a), Some(b)) if a <= b => a..b.saturating_add(1).min(len),
        _ => return Wanted::All,
    };
    if range.start >= len {
        Wanted::Unsatisfiable
    } else {
        Wanted::Part(range)
    }
}

/// The status and byte range to send of `len` bytes for the request's `Range`.
fn plan(range: Option<&str>, len: u64) -> Result<(StatusCode, Range<u64>), ApiError> {
    match wanted(range, len) {
        Wanted::All => Ok((StatusCode::OK, 0..len)),
        Wanted::Part(part) => Ok((StatusCode::PARTIAL_CONTENT, part)),
        Wanted::Unsatisfiable => Err(ApiError::RangeNotSatisfiable { len }),
    }
}

/// A response with `body` holding `part` of `len` bytes.
fn response(
    body: Body,
    status: StatusCode,
    part: Range<u64>,
    len: u64,
    content_type: &'static str,
    download_name: &str,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, (part.end - part.start).into());
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {}-{}/{len}", part.start, part.end - 1);
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(header::CONTENT_RANGE, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{download_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}

/// The response for `path` (`content_type`) and the request's `Range`, with the status it
/// has; the body streams from the file opened here.
pub async fn respond(
    path: &Path,
    content_type: &'static str,
    download_name: &str,
    range: Option<&str>,
) -> Result<Response, ApiError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ApiError::NotFound(format!(
                "{} is not there (yet)",
                path.file_name().unwrap_or_default().to_string_lossy()
            )),
            _ => ApiError::Unavailable(format!("opening {}: {e}", path.display())),
        })?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::Unavailable(format!("{}: {e}", path.display())))?
        .len();
    let (status, part) = plan(range, len)?;
    file.seek(SeekFrom::Start(part.start))
        .await
        .map_err(|e| ApiError::Unavailable(format!("{}: {e}", path.display())))?;
    // A live recording's file grows: send the length announced, not what it has become.
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(
        file.take(part.end - part.start),
    ));
    Ok(response(
        body,
        status,
        part,
        len,
        content_type,
        download_name,
    ))
}

/// The response for bytes made in memory (the stitched audio of an interaction).
pub fn respond_bytes(
    bytes: Vec<u8>,
    content_type: &'static str,
    download_name: &str,
    range: Option<&str>,
) -> Result<Response, ApiError> {
    let len = bytes.len() as u64;
    let (status, part) = plan(range, len)?;
    let body = Body::from(bytes::Bytes::from(bytes).slice(part.start as usize..part.end as usize));
    Ok(response(
        body,
        status,
        part,
        len,
        content_type,
        download_name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_as_rfc_9110_reads_them() {
        let w = |r: &str| wanted(Some(r), 1000);
        assert_eq!(wanted(None, 1000), Wanted::All);
        assert_eq!(w("bytes=0-99"), Wanted::Part(0..100));
        assert_eq!(w("bytes=900-"), Wanted::Part(900..1000));
        assert_eq!(w("bytes=-10"), Wanted::Part(990..1000));
        assert_eq!(w("bytes=-5000"), Wanted::Part(0..1000));
        assert_eq!(w("bytes=990-5000"), Wanted::Part(990..1000));
        assert_eq!(w("bytes=1000-"), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=2000-3000"), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=-0"), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=5-1"), Wanted::All);
        assert_eq!(w("bytes=0-1,5-9"), Wanted::All);
        assert_eq!(w("items=0-1"), Wanted::All);
        assert_eq!(w("bytes=x-"), Wanted::All);
        assert_eq!(wanted(Some("bytes=0-"), 0), Wanted::Unsatisfiable);
    }
}
