//! Active health checking: a `Discover` adapter that passes on only endpoints whose probes
//! pass. The behaviour is documented on [`HealthCheck`].

mod check;
mod config;
pub(crate) mod probe;
mod schedule;
mod status;
mod tcp;

pub use check::HealthCheck;
pub use config::{HealthCheckBuilder, InitialHealth};
pub use probe::{
    probe_fn, BoxProbeFuture, Probe, ProbeError, ProbeErrorKind, ProbeFn, ProbeFnFuture,
    ProbeOutcome,
};
pub use status::{EndpointHealth, HealthStatus};
pub use tcp::TcpProbe;
