//! An HTTP image source that survives dropped connections: it retries with back-off and
//! resumes with a `Range` request exactly at the byte where the previous response stopped.

use std::io::{self, Read};
use std::thread;
use std::time::Duration;

/// How hard to try before giving up.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Consecutive failed attempts (no byte received in between) before giving up.
    pub attempts: u32,
    /// Wait after the first failure; doubled after each further one, up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// A connection that delivers nothing for this long counts as dropped.
    pub read_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the download could not continue.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("GET {url}: server answered {status}")]
    Status { url: String, status: u16 },
    #[error(
        "GET {url}: resuming at byte {offset} got status {status} instead of 206 (no range \
         support, or the file changed on the server)"
    )]
    CannotResume {
        url: String,
        offset: u64,
        status: u16,
    },
    #[error(
        "GET {url}: asked to resume at byte {offset}, server sent Content-Range {content_range:?}"
    )]
    WrongRange {
        url: String,
        offset: u64,
        content_range: String,
    },
    #[error(
        "GET {url}: gave up at byte {offset} after {attempts} failed attempts; last error: {last}"
    )]
    GaveUp {
        url: String,
        offset: u64,
        attempts: u32,
        last: String,
    },
}

impl From<HttpError> for io::Error {
    fn from(error: HttpError) -> Self {
        io::Error::other(error)
    }
}

/// One failed attempt: either worth retrying, or final.
enum Attempt {
    Retry(String),
    Fatal(HttpError),
}

/// `Read` over an HTTP(S-less) GET of `url`, with transparent resume.
pub struct HttpSource {
    agent: ureq::Agent,
    url: String,
    policy: RetryPolicy,
    body: Option<Box<dyn Read + Send + Sync>>,
    /// Bytes of the resource delivered to our reader so far; the next byte we need.
    offset: u64,
    /// Length of the whole resource, when the server said it.
    total: Option<u64>,
    /// Strong ETag or Last-Modified of the first response, sent as `If-Range` so a resumed
    /// response can only continue the same file.
    validator: Option<String>,
    failures: u32,
    resumes: u32,
}

impl HttpSource {
    /// Sends the first GET (retrying as the policy says) and returns once the status is 200.
    pub fn open(url: &str, policy: RetryPolicy) -> Result<Self, HttpError> {
        let mut source = Self::new(url, policy);
        source.connect()?;
        Ok(source)
    }

    /// Like [`HttpSource::open`], but connects on the first read: every failure, including
    /// the first request's, then surfaces from the reader (and so from
    /// [`write_image`](super::write_image), which leaves the disk unbootable).
    pub fn new(url: &str, policy: RetryPolicy) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(policy.connect_timeout)
            .timeout_read(policy.read_timeout)
            .build();
        Self {
            agent,
            url: url.to_owned(),
            policy,
            body: None,
            offset: 0,
            total: None,
            validator: None,
            failures: 0,
            resumes: 0,
        }
    }

    /// Length of the resource in bytes, if the server sent `Content-Length`.
    pub fn total_len(&self) -> Option<u64> {
        self.total
    }

    /// How many times the download was resumed after a failure.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// (Re)connects, retrying with back-off until a response body positioned at `offset` is
    /// available or the policy gives up.
    fn connect(&mut self) -> Result<(), HttpError> {
        loop {
            match self.try_connect() {
                Ok(body) => {
                    self.body = Some(body);
                    return Ok(());
                }
                Err(Attempt::Fatal(error)) => return Err(error),
                Err(Attempt::Retry(reason)) => self.failed(reason)?,
            }
        }
    }

    /// Counts a failure; sleeps the back-off, or gives up.
    fn failed(&mut self, reason: String) -> Result<(), HttpError> {
        self.body = None;
        self.failures += 1;
        if self.failures >= self.policy.attempts {
            return Err(HttpError::GaveUp {
                url: self.url.clone(),
                offset: self.offset,
                attempts: self.failures,
                last: reason,
            });
        }
        let backoff = self
            .policy
            .initial_backoff
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(self.policy.max_backoff);
        tracing::warn!(
            url = %self.url, offset = self.offset, attempt = self.failures, error = %reason,
            "image download interrupted; retrying in {backoff:?}"
        );
        thread::sleep(backoff);
        Ok(())
    }

    fn try_connect(&mut self) -> Result<Box<dyn Read + Send + Sync>, Attempt> {
        let mut request = self.agent.get(&self.url);
        if self.offset > 0 {
            request = request.set("Range", &format!("bytes={}-", self.offset));
            if let Some(validator) = &self.validator {
                request = request.set("If-Range", validator);
            }
        }
        let response = match request.call() {
            Ok(response) => response,
            Err(ureq::Error::Status(status, _)) if status >= 500 || status == 429 => {
                return Err(Attempt::Retry(format!("server answered {status}")))
            }
            Err(ureq::Error::Status(status, _)) => {
                return Err(Attempt::Fatal(HttpError::Status {
                    url: self.url.clone(),
                    status,
                }))
            }
            Err(transport) => return Err(Attempt::Retry(transport.to_string())),
        };
        let status = response.status();
        if self.offset == 0 {
            if status != 200 {
                return Err(Attempt::Fatal(HttpError::Status {
                    url: self.url.clone(),
                    status,
                }));
            }
            self.total = response
                .header("Content-Length")
                .and_then(|v| v.parse().ok());
            // A weak ETag may not be used in If-Range (RFC 9110 13.1.5).
            self.validator = response
                .header("ETag")
                .filter(|tag| !tag.starts_with("W/"))
                .or_else(|| response.header("Last-Modified"))
                .map(str::to_owned);
        } else {
            if status != 206 {
                return Err(Attempt::Fatal(HttpError::CannotResume {
                    url: self.url.clone(),
                    offset: self.offset,
                    status,
                }));
            }
            let content_range = response
                .header("Content-Range")
                .unwrap_or_default()
                .to_owned();
            if !self.range_continues_here(&content_range) {
                return Err(Attempt::Fatal(HttpError::WrongRange {
                    url: self.url.clone(),
                    offset: self.offset,
                    content_range,
                }));
            }
            self.resumes += 1;
            tracing::info!(url = %self.url, offset = self.offset, "image download resumed");
        }
        Ok(response.into_reader())
    }

    /// `Content-Range: bytes START-END/TOTAL` must start at our offset and, when we know the
    /// total, describe the same total.
    fn range_continues_here(&self, content_range: &str) -> bool {
        let Some(spec) = content_range.strip_prefix("bytes ") else {
            return false;
        };
        let Some((range, total)) = spec.split_once('/') else {
            return false;
        };
        let Some((start, _end)) = range.split_once('-') else {
            return false;
        };
        let total_matches = match (self.total, total.parse::<u64>()) {
            (Some(known), Ok(said)) => known == said,
            (Some(_), Err(_)) => false,
            (None, _) => true,
        };
        start.parse::<u64>().ok() == Some(self.offset) && total_matches
    }
}

impl Read for HttpSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.total.is_some_and(|total| self.offset >= total) {
                return Ok(0);
            }
            let body = match &mut self.body {
                Some(body) => body,
                None => {
                    self.connect()?;
                    continue;
                }
            };
            match body.read(buf) {
                Ok(0) if self.total.is_some() => {
                    // The connection closed before Content-Length bytes arrived.
                    self.failed(format!("connection closed at byte {}", self.offset))?;
                }
                Ok(0) => return Ok(0),
                Ok(n) => {
                    self.offset += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.failed(e.to_string())?,
            }
        }
    }
}
