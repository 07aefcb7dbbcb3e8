//! The crate's errors.

use std::fmt;

/// A setting was rejected where it was given.
///
/// ```
/// use tower_lb_kube::EndpointSlices;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
/// let err = EndpointSlices::new(client, "default", "Not_A_Service").unwrap_err();
/// assert_eq!(err.setting(), "service");
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    setting: &'static str,
    problem: String,
}

impl ConfigError {
    pub(crate) fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }

    /// The name of the rejected setting.
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// What the [`EndpointSlices`](crate::EndpointSlices) stream reports besides changes.
///
/// None of these ends the stream: a balancer logs them (`tracing`), counts them in its stats
/// (`discovery_errors`) and keeps its last endpoint set, and the stream goes on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Listing or watching failed (the API server unreachable, the request refused, the watch
    /// expired). The watch is retried after a backoff; an expired one (`410 Gone`) is listed
    /// again.
    Watch(kube::runtime::watcher::Error),
    /// An EndpointSlice, or one endpoint in it, could not be used and was skipped: the
    /// selected port is missing, or an address is not an IP address.
    BadSlice {
        /// The slice's name.
        slice: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Error {
    pub(crate) fn bad_slice(slice: &str, problem: impl Into<String>) -> Self {
        Error::BadSlice {
            slice: slice.to_owned(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Watch(error) => write!(f, "watching EndpointSlices failed: {error}"),
            Error::BadSlice { slice, problem } => {
                write!(f, "EndpointSlice {slice:?} skipped: {problem}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Watch(error) => Some(error),
            Error::BadSlice { .. } => None,
        }
    }
}
