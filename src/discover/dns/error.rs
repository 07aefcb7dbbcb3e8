//! Why a resolution failed.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::BoxError;

/// A resolution that failed or found nothing. The [`Dns`](super::Dns) stream yields it as a
/// discovery error (the balancer counts it in `Stats::discovery_errors` and logs it) and
/// keeps the name's last addresses.
#[derive(Debug)]
pub struct DnsError {
    name: Arc<str>,
    kind: DnsErrorKind,
    source: Option<BoxError>,
    kept: usize,
    retry_in: Duration,
}

/// What went wrong in a [`DnsError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DnsErrorKind {
    /// The name does not exist (NXDOMAIN).
    NoSuchName,
    /// The name exists but has no usable records: no A/AAAA records, or no SRV record whose
    /// target has an address.
    NoRecords,
    /// The resolution took longer than the configured timeout.
    TimedOut,
    /// The DNS server failed or could not be reached.
    Failed,
}

impl DnsError {
    pub(super) fn new(name: Arc<str>, kind: DnsErrorKind, source: Option<BoxError>) -> Self {
        Self {
            name,
            kind,
            source,
            kept: 0,
            retry_in: Duration::ZERO,
        }
    }

    pub(super) fn with_retry(mut self, kept: usize, retry_in: Duration) -> Self {
        self.kept = kept;
        self.retry_in = retry_in;
        self
    }

    /// The name, as configured.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What went wrong.
    pub fn kind(&self) -> DnsErrorKind {
        self.kind
    }

    /// How many addresses of this name are kept from its last good answer.
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// When the name will be resolved again.
    pub fn retry_in(&self) -> Duration {
        self.retry_in
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            DnsErrorKind::NoSuchName => "no such name",
            DnsErrorKind::NoRecords => "no usable records",
            DnsErrorKind::TimedOut => "timed out",
            DnsErrorKind::Failed => "resolution failed",
        };
        write!(f, "DNS {:?}: {what}", self.name)?;
        if let Some(source) = &self.source {
            write!(f, " ({source})")?;
        }
        write!(
            f,
            "; keeping its last {} address{}, retrying in {:.1?}",
            self.kept,
            if self.kept == 1 { "" } else { "es" },
            self.retry_in
        )
    }
}

impl std::error::Error for DnsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}
