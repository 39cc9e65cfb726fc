//! The guard: a tower layer in front of every gRPC service that decides, for
//! each request and before any handler runs, whether it may proceed.
//!
//! In order, each request is:
//! 1. authenticated from its connection's [`Peer`] (`UNAUTHENTICATED`);
//! 2. authorized against [`crate::access::RPC_ACCESS`] (`PERMISSION_DENIED`,
//!    or `UNIMPLEMENTED` for a path that names no RPC custos serves);
//! 3. rate-limited per client identity (`RESOURCE_EXHAUSTED` with `RetryInfo`);
//! 4. admitted under the server-wide concurrency limit (`RESOURCE_EXHAUSTED`);
//! 5. size-limited: a request message over the limit is refused with
//!    `RESOURCE_EXHAUSTED` as soon as its length prefix arrives;
//! 6. given a deadline: the client's `grpc-timeout`, capped by the server's
//!    maximum (`DEADLINE_EXCEEDED`).
//!
//! Admitted requests run to completion on their own task even if the client
//! goes away or the deadline passes: a withdrawal half-way between its log
//! entry and its signature is finished, never torn, and a retry with the same
//! `request_id` returns its outcome.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http_body::Frame;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower_service::Service;

use crate::access::{Access, Principal, rpc_access};
use crate::status::reason;
use crate::tls::{ConnInfo, Peer};

/// Limits on what one request, and one identity, may cost.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Largest request message accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    /// Largest response message sent, in bytes.
    pub max_response_bytes: usize,
    /// Longest any request may run before its reply; a client's shorter
    /// `grpc-timeout` is honoured.
    pub max_deadline: Duration,
    /// Requests in flight across all clients; more get RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Sustained requests per second per client identity.
    pub requests_per_second: f64,
    /// Requests a client identity may make at once above its sustained rate.
    pub burst: f64,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection closes.
    pub keepalive_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
            max_response_bytes: 4 * 1024 * 1024,
            max_deadline: Duration::from_secs(30),
            max_concurrent_requests: 512,
            requests_per_second: 5000.0,
            burst: 10000.0,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// The shared state of the guard: limits, per-identity rate buckets, and the
/// in-flight request count.
#[derive(Debug)]
pub struct Guard {
    limits: LimitsConfig,
    buckets: Mutex<HashMap<String, Bucket>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Guard {
    /// A guard enforcing `limits`.
    pub fn new(limits: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            in_flight: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests)),
            buckets: Mutex::new(HashMap::new()),
            limits,
        })
    }

    /// The tower layer enforcing this guard.
    pub fn layer(self: &Arc<Self>) -> GuardLayer {
        GuardLayer {
            guard: Arc::clone(self),
        }
    }

    /// Steps 1 and 2: who is calling `path` over a connection to `peer`, and
    /// may they? `Ok(None)` admits an anonymous caller to a public RPC.
    pub fn authorize(&self, path: &str, peer: &Peer, now: SystemTime) -> Result<Option<Principal>, Status> {
        let access = rpc_access(path);
        let principal = match peer {
            Peer::Plaintext => return Ok(Some(Principal::InsecurePlaintext)),
            Peer::Client { entry, not_after } if now <= *not_after => Some(Principal::Client {
                identity: entry.identity.clone(),
                roles: entry.roles,
                approver_id: entry.approver_id.clone(),
            }),
            Peer::Client { .. } | Peer::Anonymous | Peer::Untrusted | Peer::Unregistered { .. } => None,
        };
        match (access, principal) {
            (Some(Access::Public), principal) => Ok(principal),
            (_, None) => Err(unauthenticated(peer)),
            // Only a path that names no RPC: clients that fall back on
            // UNIMPLEMENTED (reflection versions, say) work, and nobody
            // unauthenticated learns what is served.
            (None, Some(_)) => Err(crate::status::status(
                Code::Unimplemented,
                reason::UNIMPLEMENTED,
                format!("custos does not serve {path}"),
            )),
            (Some(Access::Roles(allowed)), Some(principal @ Principal::Client { roles, .. }))
                if roles.intersects(allowed) =>
            {
                Ok(Some(principal))
            }
            (_, Some(principal)) => {
                tracing::warn!(caller = %principal.name(), path, "permission denied");
                Err(crate::status::status(
                    Code::PermissionDenied,
                    reason::PERMISSION_DENIED,
                    format!("{} may not call {path}", principal.name()),
                ))
            }
        }
    }

    /// Step 3: takes one request from `caller`'s token bucket, or says how
    /// long until one is available.
    pub fn take_token(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let rate = self.limits.requests_per_second;
        let burst = self.limits.burst;
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets.entry(caller.to_owned()).or_insert(Bucket {
            tokens: burst,
            refilled: now,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    /// Step 6: the deadline for a request with this `grpc-timeout` header.
    pub fn deadline(&self, grpc_timeout: Option<&http::HeaderValue>) -> Duration {
        grpc_timeout
            .and_then(|v| parse_grpc_timeout(v.to_str().ok()?))
            .map_or(self.limits.max_deadline, |d| d.min(self.limits.max_deadline))
    }
}

fn unauthenticated(peer: &Peer) -> Status {
    let message = match peer {
        Peer::Anonymous => "a client certificate is required",
        Peer::Untrusted => {
            "the client certificate is not trusted (unknown issuer, expired or not for client use)"
        }
        Peer::Unregistered { .. } => "the client certificate names no configured client",
        Peer::Client { .. } => "the client certificate has expired",
        Peer::Plaintext => "plaintext connections are not authenticated",
    };
    crate::status::status(Code::Unauthenticated, reason::UNAUTHENTICATED, message)
}

/// Parses a gRPC `grpc-timeout` value: up to 8 digits and a unit.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The tower layer of a [`Guard`].
#[derive(Debug, Clone)]
pub struct GuardLayer {
    guard: Arc<Guard>,
}

impl<S> tower_layer::Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> GuardService<S> {
        GuardService {
            guard: Arc::clone(&self.guard),
            inner,
        }
    }
}

/// The service a [`GuardLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct GuardService<S> {
    guard: Arc<Guard>,
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for GuardService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = Arc::clone(&self.guard);
        let admitted = admit(&guard, &mut request);
        Box::pin(async move {
            let permit = match admitted {
                Ok(permit) => permit,
                Err(status) => return Ok(status.into_http()),
            };
            let deadline = guard.deadline(request.headers().get("grpc-timeout"));
            let limit = guard.limits.max_request_bytes;
            let request = request.map(|body| Body::new(LimitedBody::new(body, limit)));
            let handler = tokio::spawn(async move {
                let response = inner.call(request).await;
                drop(permit);
                response
            });
            match tokio::time::timeout(deadline, handler).await {
                Ok(Ok(response)) => response,
                Ok(Err(join_error)) => {
                    tracing::error!(error = %join_error, "request handler panicked");
                    Ok(crate::status::status(Code::Internal, crate::status::reason::INTERNAL, "internal error").into_http())
                }
                Err(_) => Ok(crate::status::status(
                    Code::DeadlineExceeded,
                    reason::DEADLINE_EXCEEDED,
                    format!(
                        "no reply within the {} ms deadline; the request still completes, and a retry with the same request id returns its outcome",
                        deadline.as_millis()
                    ),
                )
                .into_http()),
            }
        })
    }
}

/// Steps 1 to 4 for one request: on success the request carries its
/// [`Principal`] and holds a concurrency permit.
fn admit(
    guard: &Guard,
    request: &mut http::Request<Body>,
) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
    let peer = request
        .extensions()
        .get::<ConnInfo>()
        .map_or(Arc::new(Peer::Anonymous), |info| Arc::clone(&info.peer));
    let path = request.uri().path().to_owned();
    let principal = guard.authorize(&path, &peer, SystemTime::now())?;
    if let Some(principal) = principal {
        let caller = principal.name();
        if let Err(wait) = guard.take_token(&caller, Instant::now()) {
            tracing::warn!(%caller, path, "rate limited");
            let mut details = ErrorDetails::with_retry_info(Some(wait));
            details.set_error_info(reason::RATE_LIMITED, crate::status::ERROR_DOMAIN, HashMap::new());
            return Err(Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "{caller} is over its request rate; retry after {} ms",
                    wait.as_millis().max(1)
                ),
                details,
            ));
        }
        request.extensions_mut().insert(principal);
    }
    Arc::clone(&guard.in_flight).try_acquire_owned().map_err(|_| {
        tracing::warn!(path, "concurrency limit reached");
        crate::status::status(
            Code::ResourceExhausted,
            reason::OVERLOADED,
            format!(
                "the server is at its limit of {} requests in flight; retry shortly",
                guard.limits.max_concurrent_requests
            ),
        )
    })
}

/// A request body that refuses any gRPC message longer than `limit`,
/// reading each message's 5-byte length prefix as it streams past, so that
/// an oversized message is refused before it is buffered.
struct LimitedBody {
    inner: Body,
    limit: usize,
    /// Bytes of the current message's prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Payload bytes of the current message still to come.
    payload_left: usize,
}

impl LimitedBody {
    fn new(inner: Body, limit: usize) -> Self {
        Self {
            inner,
            limit,
            prefix: [0; 5],
            prefix_len: 0,
            payload_left: 0,
        }
    }

    /// Advances the framing state over `data`; an error if a message
    /// announces more than the limit.
    fn scan(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                let len = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]])
                    as usize;
                if len > self.limit {
                    return Err(crate::status::status(
                        Code::ResourceExhausted,
                        reason::MESSAGE_TOO_LARGE,
                        format!(
                            "request message of {len} bytes exceeds the {}-byte limit",
                            self.limit
                        ),
                    ));
                }
                self.prefix_len = 0;
                self.payload_left = len;
            }
        }
        Ok(())
    }
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            this.scan(data)?;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{ClientEntry, ClientIdentity, Role, Roles};

    fn guard() -> Arc<Guard> {
        Guard::new(LimitsConfig {
            requests_per_second: 10.0,
            burst: 3.0,
            ..LimitsConfig::default()
        })
    }

    fn client(role: Role, not_after: SystemTime) -> Peer {
        Peer::Client {
            entry: ClientEntry {
                identity: ClientIdentity::parse("uri:spiffe://t/x").unwrap(),
                roles: Roles::of(&[role]),
                approver_id: (role == Role::Approver).then(|| "x".to_owned()),
            },
            not_after,
        }
    }

    #[test]
    fn grpc_timeouts_parse_and_are_capped() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "m", "100", "123456789m", "-1S", "1x", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let guard = guard();
        let header = http::HeaderValue::from_static("1H");
        assert_eq!(guard.deadline(Some(&header)), Duration::from_secs(30));
        let header = http::HeaderValue::from_static("250m");
        assert_eq!(guard.deadline(Some(&header)), Duration::from_millis(250));
        assert_eq!(guard.deadline(None), Duration::from_secs(30));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_the_rate() {
        let guard = guard();
        let start = Instant::now();
        for _ in 0..3 {
            assert!(guard.take_token("a", start).is_ok());
        }
        let wait = guard.take_token("a", start).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another identity has its own bucket.
        assert!(guard.take_token("b", start).is_ok());
        // 100 ms later one more request fits, and only one.
        let later = start + Duration::from_millis(100);
        assert!(guard.take_token("a", later).is_ok());
        assert!(guard.take_token("a", later).is_err());
    }

    #[test]
    fn expired_and_unknown_peers_are_unauthenticated() {
        let guard = guard();
        let now = SystemTime::now();
        let path = "/custos.v1.WithdrawalService/CreateWithdrawal";
        let past = now - Duration::from_secs(1);
        for peer in [
            Peer::Anonymous,
            Peer::Untrusted,
            Peer::Unregistered { sans: vec![] },
            client(Role::Backend, past),
        ] {
            let err = guard.authorize(path, &peer, now).unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{peer:?}");
        }
        let err = guard
            .authorize(path, &client(Role::Auditor, now + Duration::from_secs(60)), now)
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            guard
                .authorize(path, &client(Role::Backend, now + Duration::from_secs(60)), now)
                .unwrap()
                .is_some()
        );
        // Health answers anyone; an unknown method is UNIMPLEMENTED to a
        // client and UNAUTHENTICATED to anyone else.
        assert_eq!(
            guard
                .authorize("/grpc.health.v1.Health/Check", &Peer::Anonymous, now)
                .unwrap(),
            None
        );
        let backend = client(Role::Backend, now + Duration::from_secs(60));
        let err = guard
            .authorize("/custos.v1.WalletService/DropAll", &backend, now)
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        let err = guard
            .authorize("/custos.v1.WalletService/DropAll", &Peer::Anonymous, now)
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[test]
    fn oversized_messages_are_refused_from_their_prefix() {
        let mut body = LimitedBody::new(Body::empty(), 10);
        // One 4-byte message, then a prefix announcing 11 bytes, split across chunks.
        body.scan(&[0, 0, 0, 0, 4, 1, 2]).unwrap();
        body.scan(&[3, 4, 0, 0]).unwrap();
        let err = body.scan(&[0, 0, 11]).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        let mut body = LimitedBody::new(Body::empty(), 10);
        body.scan(&[0, 0, 0, 0, 10]).unwrap();
        body.scan(&[0; 10]).unwrap();
    }
}
