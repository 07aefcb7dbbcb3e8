//! The default response classifier: HTTP 5xx, and the gRPC statuses that say the server
//! failed.

use std::fmt;

use http::{HeaderMap, Response, StatusCode};
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcCode, GrpcEosErrorsAsFailures,
    GrpcErrorsAsFailures, GrpcFailureClass,
};

/// gRPC statuses that say the caller erred, or that the call was refused by the application,
/// rather than that the server failed: they never count against an endpoint by default.
const CALLER_CODES: [GrpcCode; 10] = [
    GrpcCode::Cancelled,
    GrpcCode::InvalidArgument,
    GrpcCode::NotFound,
    GrpcCode::AlreadyExists,
    GrpcCode::PermissionDenied,
    GrpcCode::FailedPrecondition,
    GrpcCode::Aborted,
    GrpcCode::OutOfRange,
    GrpcCode::Unimplemented,
    GrpcCode::Unauthenticated,
];

/// Judges responses the way a load balancer should: what says the **server** failed counts,
/// what the caller caused does not. The default classifier of
/// [`TrackBody`](super::TrackBody); a [`tower-http` classifier](tower_http::classify).
///
/// - **HTTP**: a 5xx status is a failure (as tower-http's `ServerErrorsAsFailures`, nginx's
///   `proxy_next_upstream` and Envoy's `consecutive_5xx`); 4xx is the caller's.
/// - **gRPC** (a `content-type` of `application/grpc…`): the `grpc-status` of a trailers-only
///   response's headers, or of the trailers when the stream ends. By default `UNKNOWN`,
///   `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL`, `UNAVAILABLE` and `DATA_LOSS` are
///   failures — Envoy's gRPC retry set (`cancelled` aside, which a caller causes) plus the two
///   a server reports of itself (`UNKNOWN` for an unhandled error, `DATA_LOSS`). The codes
///   that describe the request (`INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`…), a
///   caller's cancellation and `UNIMPLEMENTED` (a method the caller should not call) are not,
///   though linkerd counts every non-`OK` status in its success rate: a client that sends bad
///   requests must not eject healthy servers. A non-200 HTTP status on a gRPC response is a
///   failure if it is 5xx. [`grpc_strict`](Self::grpc_strict) and
///   [`grpc_success`](Self::grpc_success) change the set.
#[derive(Clone, Debug)]
pub struct ServerFailures {
    grpc: GrpcErrorsAsFailures,
}

impl Default for ServerFailures {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerFailures {
    /// 5xx, and the default gRPC failures above.
    pub fn new() -> Self {
        let grpc = CALLER_CODES.into_iter().fold(
            GrpcErrorsAsFailures::new(),
            GrpcErrorsAsFailures::with_success,
        );
        Self { grpc }
    }

    /// Counts every gRPC status but `OK` as a failure, as linkerd's success rate does; add
    /// exceptions with [`grpc_success`](Self::grpc_success).
    pub fn grpc_strict() -> Self {
        Self {
            grpc: GrpcErrorsAsFailures::new(),
        }
    }

    /// Does not count `code` as a failure.
    pub fn grpc_success(mut self, code: GrpcCode) -> Self {
        self.grpc = self.grpc.with_success(code);
        self
    }
}

/// Why [`ServerFailures`] counted a response as a failure.
#[derive(Debug)]
pub enum ServerFailure {
    /// An HTTP 5xx status.
    Status(StatusCode),
    /// A gRPC status (or error) that says the server failed.
    Grpc(GrpcFailureClass),
    /// The endpoint's service or the body failed.
    Error(String),
}

impl fmt::Display for ServerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerFailure::Status(status) => write!(f, "status {status}"),
            ServerFailure::Grpc(class) => write!(f, "gRPC {class}"),
            ServerFailure::Error(error) => write!(f, "error: {error}"),
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

impl ClassifyResponse for ServerFailures {
    type FailureClass = ServerFailure;
    type ClassifyEos = ServerFailuresEos;

    fn classify_response<B>(
        self,
        response: &Response<B>,
    ) -> ClassifiedResponse<ServerFailure, ServerFailuresEos> {
        let status = response.status();
        if status.is_server_error() {
            return ClassifiedResponse::Ready(Err(ServerFailure::Status(status)));
        }
        if !is_grpc(response.headers()) {
            return ClassifiedResponse::Ready(Ok(()));
        }
        match self.grpc.classify_response(response) {
            ClassifiedResponse::Ready(result) => {
                ClassifiedResponse::Ready(result.map_err(ServerFailure::Grpc))
            }
            ClassifiedResponse::RequiresEos(eos) => {
                ClassifiedResponse::RequiresEos(ServerFailuresEos { grpc: eos })
            }
        }
    }

    fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> ServerFailure {
        ServerFailure::Error(error.to_string())
    }
}

/// Judges the end of a gRPC stream for [`ServerFailures`]: the status in its trailers. A
/// stream that ends without a `grpc-status` trailer broke the protocol: a failure.
#[derive(Clone, Debug)]
pub struct ServerFailuresEos {
    grpc: GrpcEosErrorsAsFailures,
}

impl ClassifyEos for ServerFailuresEos {
    type FailureClass = ServerFailure;

    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), ServerFailure> {
        match trailers {
            Some(trailers) if trailers.contains_key("grpc-status") => self
                .grpc
                .classify_eos(Some(trailers))
                .map_err(ServerFailure::Grpc),
            _ => Err(ServerFailure::Error(
                "the gRPC stream ended without a grpc-status".to_owned(),
            )),
        }
    }

    fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> ServerFailure {
        ServerFailure::Error(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(response: Response<()>, trailers: Option<HeaderMap>) -> bool {
        match ServerFailures::new().classify_response(&response) {
            ClassifiedResponse::Ready(result) => result.is_err(),
            ClassifiedResponse::RequiresEos(eos) => eos.classify_eos(trailers.as_ref()).is_err(),
        }
    }

    fn grpc(status: Option<i32>) -> Response<()> {
        let mut response = Response::builder().header("content-type", "application/grpc+proto");
        if let Some(status) = status {
            response = response.header("grpc-status", status.to_string());
        }
        response.body(()).unwrap()
    }

    fn trailers(status: i32) -> Option<HeaderMap> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", status.to_string().parse().unwrap());
        Some(trailers)
    }

    #[test]
    fn http_5xx_fails_and_4xx_does_not() {
        let status = |code: u16| Response::builder().status(code).body(()).unwrap();
        assert!(judge(status(503), None));
        assert!(judge(status(500), None));
        assert!(!judge(status(404), None));
        assert!(!judge(status(200), None));
    }

    #[test]
    fn grpc_statuses_are_read_from_headers_or_trailers() {
        // Trailers-only responses carry the status in their headers.
        assert!(judge(grpc(Some(14)), None), "UNAVAILABLE");
        assert!(!judge(grpc(Some(5)), None), "NOT_FOUND is the caller's");
        assert!(!judge(grpc(Some(0)), None));
        // Streams carry it in their trailers.
        for (code, fails) in [
            (0, false),
            (2, true),
            (3, false),
            (4, true),
            (8, true),
            (12, false),
            (13, true),
            (14, true),
            (15, true),
            (16, false),
        ] {
            assert_eq!(judge(grpc(None), trailers(code)), fails, "code {code}");
        }
        assert!(
            judge(grpc(None), None),
            "a stream without a status broke the protocol"
        );
        assert!(judge(
            Response::builder()
                .status(503)
                .header("content-type", "application/grpc")
                .body(())
                .unwrap(),
            None
        ));
    }

    #[test]
    fn the_grpc_set_can_be_changed() {
        let strict = ServerFailures::grpc_strict();
        let ClassifiedResponse::Ready(result) = strict.classify_response(&grpc(Some(5))) else {
            panic!("a trailers-only response is judged at once");
        };
        assert!(result.is_err(), "strict: NOT_FOUND fails");
        let lenient = ServerFailures::new().grpc_success(GrpcCode::Unavailable);
        let ClassifiedResponse::Ready(result) = lenient.classify_response(&grpc(Some(14))) else {
            panic!("a trailers-only response is judged at once");
        };
        assert!(result.is_ok());
        let strict_but_not_found = ServerFailures::grpc_strict().grpc_success(GrpcCode::NotFound);
        let ClassifiedResponse::Ready(result) =
            strict_but_not_found.classify_response(&grpc(Some(7)))
        else {
            panic!("a trailers-only response is judged at once");
        };
        assert!(result.is_err());
    }
}
