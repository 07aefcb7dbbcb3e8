//! Outlier detection settings.

use std::time::Duration;

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

impl OutlierDetection {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Failures in a row that eject an endpoint; at least 1.
    pub fn consecutive_failures(mut self, failures: u32) -> Result<Self, ConfigError> {
        if failures == 0 {
            return Err(ConfigError::new(
                "consecutive_failures",
                "must be at least 1 (leave outlier detection off to disable it)",
            ));
        }
        self.consecutive_failures = failures;
        Ok(self)
    }

    /// The first ejection's length; later ones are this times the number of ejections.
    pub fn base_ejection_time(mut self, time: Duration) -> Result<Self, ConfigError> {
        if time.is_zero() {
            return Err(ConfigError::new("base_ejection_time", "must not be zero"));
        }
        if time > self.max_ejection_time {
            self.max_ejection_time = time;
        }
        self.base_ejection_time = time;
        Ok(self)
    }

    /// The longest ejection; also how long a returned endpoint must stay healthy before its
    /// ejection count starts over.
    pub fn max_ejection_time(mut self, time: Duration) -> Result<Self, ConfigError> {
        if time < self.base_ejection_time {
            return Err(ConfigError::new(
                "max_ejection_time",
                format!(
                    "{time:?} is shorter than the base ejection time {:?}",
                    self.base_ejection_time
                ),
            ));
        }
        self.max_ejection_time = time;
        Ok(self)
    }

    /// The largest share of endpoints ejected at once, in percent (0–100); one endpoint may
    /// always be ejected.
    pub fn max_ejected_percent(mut self, percent: u8) -> Result<Self, ConfigError> {
        if percent > 100 {
            return Err(ConfigError::new(
                "max_ejected_percent",
                format!("{percent} is above 100"),
            ));
        }
        self.max_ejected_percent = percent;
        Ok(self)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_time_grows_with_ejections_up_to_the_cap() {
        let od = OutlierDetection::new()
            .base_ejection_time(Duration::from_secs(10))
            .unwrap()
            .max_ejection_time(Duration::from_secs(25))
            .unwrap();
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
    fn invalid_settings_are_rejected() {
        assert!(OutlierDetection::new().consecutive_failures(0).is_err());
        assert!(OutlierDetection::new()
            .base_ejection_time(Duration::ZERO)
            .is_err());
        assert!(OutlierDetection::new()
            .max_ejection_time(Duration::from_secs(1))
            .is_err());
        assert!(OutlierDetection::new().max_ejected_percent(101).is_err());
    }
}
