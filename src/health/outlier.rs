//! Outlier detection: the settings, the decision to eject (on the response path), and each
//! endpoint's ejections (timed by the discovery task).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::endpoint::{EndpointState, FailureReport, EJECTED};
use crate::error::ConfigError;

/// When and for how long the balancer ejects an endpoint that keeps failing; see
/// [`health`](crate::health).
///
/// Defaults follow Envoy: 5 consecutive failures, 30 s base ejection time, at most 300 s,
/// at most 10% of endpoints ejected (always at least one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutlierDetection {
    pub(crate) consecutive_failures: u32,
    pub(crate) base_ejection_time: Duration,
    pub(crate) max_ejection_time: Duration,
    pub(crate) max_ejected_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejected_percent: 10,
        }
    }
}

/// The longest ejection accepted: a day. Longer is a removal, which discovery or a drain
/// expresses better, and it keeps the ejection timer far from the clock's limits.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(24 * 60 * 60);

impl OutlierDetection {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Failures in a row that eject an endpoint; at least 1.
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive_failures = failures;
        self
    }

    /// The first ejection's length; later ones are this times the number of ejections. More
    /// than a day is rejected. It raises the maximum ejection time if it is above it.
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        if time > self.max_ejection_time {
            self.max_ejection_time = time;
        }
        self.base_ejection_time = time;
        self
    }

    /// The longest ejection (at least the base ejection time, at most a day); also how long a
    /// returned endpoint must stay healthy before its ejection count starts over.
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.max_ejection_time = time;
        self
    }

    /// The largest share of endpoints ejected at once, in percent (0–100); one endpoint may
    /// always be ejected.
    pub fn max_ejected_percent(mut self, percent: u8) -> Self {
        self.max_ejected_percent = percent;
        self
    }

    /// Checks every setting; the balancer does when it is given these settings
    /// ([`BalanceLayer::outlier_detection`](crate::BalanceLayer::outlier_detection)).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.consecutive_failures == 0 {
            return Err(ConfigError::new(
                "consecutive_failures",
                "must be at least 1 (leave outlier detection off to disable it)",
            ));
        }
        if self.base_ejection_time.is_zero() {
            return Err(ConfigError::new("base_ejection_time", "must not be zero"));
        }
        for (setting, time) in [
            ("base_ejection_time", self.base_ejection_time),
            ("max_ejection_time", self.max_ejection_time),
        ] {
            if time > MAX_EJECTION_TIME {
                return Err(ConfigError::new(
                    setting,
                    format!("{time:?} is longer than the one-day maximum; remove or drain the endpoint instead"),
                ));
            }
        }
        if self.max_ejection_time < self.base_ejection_time {
            return Err(ConfigError::new(
                "max_ejection_time",
                format!(
                    "{:?} is shorter than the base ejection time {:?}",
                    self.max_ejection_time, self.base_ejection_time
                ),
            ));
        }
        if self.max_ejected_percent > 100 {
            return Err(ConfigError::new(
                "max_ejected_percent",
                format!("{} is above 100", self.max_ejected_percent),
            ));
        }
        Ok(())
    }

    /// How long the `ejections`-th ejection lasts.
    pub(crate) fn ejection_time(&self, ejections: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(ejections.max(1))
            .min(self.max_ejection_time)
    }

    /// How many of `endpoints` may be ejected at once.
    pub(crate) fn max_ejected(&self, endpoints: usize) -> usize {
        (endpoints * usize::from(self.max_ejected_percent) / 100).max(1)
    }
}

/// Ejects endpoints on the response path: the failure that completes a run of
/// `consecutive_failures` ejects its endpoint at once (within the cap on ejected endpoints)
/// and wakes the discovery task, which times the ejection.
pub(crate) struct Ejector {
    eject_after: u32,
    /// How many endpoints may be ejected at once, and how many are.
    max_ejected: AtomicUsize,
    ejected: AtomicUsize,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl Ejector {
    pub(crate) fn new(config: &OutlierDetection, wake: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            eject_after: config.consecutive_failures,
            max_ejected: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            wake: Box::new(wake),
        }
    }

    /// Sets the cap for a table of `endpoints` usable endpoints.
    pub(crate) fn set_endpoints(&self, config: &OutlierDetection, endpoints: usize) {
        self.max_ejected
            .store(config.max_ejected(endpoints), Ordering::Release);
    }

    /// An ejected endpoint is back: its place under the cap is free.
    pub(crate) fn returned(&self) {
        self.ejected.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes one of the places under the cap, if one is free.
    fn try_take(&self) -> bool {
        let max = self.max_ejected.load(Ordering::Acquire);
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

impl FailureReport for Ejector {
    fn failed(&self, endpoint: &EndpointState, in_a_row: u32) {
        if in_a_row == self.eject_after && self.try_take() {
            if endpoint.set_flag(EJECTED) {
                (self.wake)();
            } else {
                // Already ejected (a race with another run's end): give the place back.
                self.returned();
            }
        }
    }
}

/// One endpoint's ejections, as the discovery task times them.
#[derive(Debug, Default)]
pub(crate) struct Ejection {
    /// Ejections since the count last started over.
    count: u32,
    /// When the current ejection ends.
    until: Option<Instant>,
    /// When the endpoint last came back.
    returned_at: Option<Instant>,
}

impl Ejection {
    /// Times an ejection the response path started; returns its length. A long healthy
    /// stretch since the last return starts the count over.
    pub(crate) fn start(&mut self, config: &OutlierDetection, now: Instant) -> Duration {
        if self
            .returned_at
            .is_some_and(|at| now.saturating_duration_since(at) >= config.max_ejection_time)
        {
            self.count = 0;
        }
        self.count += 1;
        let time = config.ejection_time(self.count);
        // A time too long for the clock means "until further notice": about 30 years.
        self.until = Some(now.checked_add(time).unwrap_or_else(far_future));
        time
    }

    /// Whether an ejection is being timed.
    pub(crate) fn is_timed(&self) -> bool {
        self.until.is_some()
    }

    /// Ends the ejection if it is due; returns whether it did.
    pub(crate) fn end_if_due(&mut self, now: Instant) -> bool {
        if self.until.is_some_and(|until| until <= now) {
            self.until = None;
            self.returned_at = Some(now);
            true
        } else {
            false
        }
    }

    /// When the current ejection ends.
    pub(crate) fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Ejections since the count last started over.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }
}

/// An instant further than any timer needs to go: about 30 years from now.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(30 * 365 * 24 * 60 * 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_time_grows_with_ejections_up_to_the_cap() {
        let od = OutlierDetection::new()
            .base_ejection_time(Duration::from_secs(10))
            .max_ejection_time(Duration::from_secs(25));
        assert_eq!(od.ejection_time(1), Duration::from_secs(10));
        assert_eq!(od.ejection_time(2), Duration::from_secs(20));
        assert_eq!(od.ejection_time(3), Duration::from_secs(25));
        assert_eq!(
            od.max_ejected(5),
            1,
            "10% of 5 rounds down, but one may always go"
        );
        assert_eq!(od.max_ejected(40), 4);
    }

    #[test]
    fn invalid_settings_are_rejected_with_the_setting_named() {
        let setting = |od: OutlierDetection| od.validate().unwrap_err().setting();
        let od = OutlierDetection::new();
        assert_eq!(setting(od.consecutive_failures(0)), "consecutive_failures");
        assert_eq!(
            setting(od.base_ejection_time(Duration::ZERO)),
            "base_ejection_time"
        );
        assert_eq!(
            setting(od.base_ejection_time(Duration::MAX)),
            "base_ejection_time"
        );
        assert_eq!(
            setting(od.max_ejection_time(Duration::MAX)),
            "max_ejection_time"
        );
        assert_eq!(
            setting(od.max_ejection_time(Duration::from_secs(1))),
            "max_ejection_time"
        );
        assert_eq!(setting(od.max_ejected_percent(101)), "max_ejected_percent");
        od.base_ejection_time(Duration::from_secs(24 * 60 * 60))
            .validate()
            .expect("a day is the maximum, and raises the maximum time");
    }
}
