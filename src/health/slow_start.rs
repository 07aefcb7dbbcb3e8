//! Slow start: the settings, and each endpoint's ramp.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::ConfigError;

/// Ramps up the share of a new or recovered endpoint over a window; see
/// [`health`](crate::health).
///
/// During the window the endpoint's effective weight is
/// `weight × max(min_weight_percent, (elapsed / window) ^ (1 / aggression))`, as in Envoy:
/// aggression 1 (the default) ramps linearly, larger values ramp faster at first. The ramp is
/// applied in 10 steps per window (each step rebuilds the picker off the request path), and
/// only affects weight-aware strategies. Endpoints present when the balancer starts do not
/// slow-start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    pub(crate) window: Duration,
    pub(crate) aggression: f64,
    pub(crate) min_weight_percent: u8,
}

/// Steps per window.
pub(crate) const STEPS: u32 = 10;
/// Effective weights are scaled by this while any endpoint ramps, so that weight-1 endpoints
/// can ramp too.
pub(crate) const SCALE: u32 = 100;

/// The longest window accepted: a day.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

impl SlowStart {
    /// A linear ramp over `window` (more than zero, at most a day), starting at 10% of the
    /// weight.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            aggression: 1.0,
            min_weight_percent: 10,
        }
    }

    /// The ramp's shape: 1 is linear, larger ramps faster at first; must be a positive number.
    pub fn aggression(mut self, aggression: f64) -> Self {
        self.aggression = aggression;
        self
    }

    /// The share of its weight a ramping endpoint starts at, in percent (1–100).
    pub fn min_weight_percent(mut self, percent: u8) -> Self {
        self.min_weight_percent = percent;
        self
    }

    /// Checks every setting; the balancer does when it is given these settings
    /// ([`BalanceLayer::slow_start`](crate::BalanceLayer::slow_start)).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.window.is_zero() || self.window > MAX_WINDOW {
            return Err(ConfigError::new(
                "slow start window",
                format!("{:?} is not between zero and a day", self.window),
            ));
        }
        if !(self.aggression.is_finite() && self.aggression > 0.0) {
            return Err(ConfigError::new(
                "slow start aggression",
                format!("{} is not a positive number", self.aggression),
            ));
        }
        if self.min_weight_percent == 0 || self.min_weight_percent > 100 {
            return Err(ConfigError::new(
                "slow start min_weight_percent",
                format!("{} is not between 1 and 100", self.min_weight_percent),
            ));
        }
        Ok(())
    }

    /// The weight factor, in 1/[`SCALE`]ths, `elapsed` into the window.
    pub(crate) fn factor(&self, elapsed: Duration) -> u32 {
        let time = (elapsed.as_secs_f64() / self.window.as_secs_f64()).clamp(0.0, 1.0);
        let ramp = time.powf(1.0 / self.aggression);
        let floor = f64::from(self.min_weight_percent) / 100.0;
        (ramp.max(floor) * f64::from(SCALE)).round() as u32
    }
}

/// One endpoint's slow start, while it lasts.
#[derive(Debug, Default)]
pub(crate) struct Ramp {
    /// When it began.
    from: Option<Instant>,
    /// The factor of the last table, so that tables are rebuilt only when the ramp moves.
    factor: u32,
}

impl Ramp {
    /// Starts (or restarts) the ramp at `now`.
    pub(crate) fn start(&mut self, now: Instant) {
        self.from = Some(now);
        self.factor = 0;
    }

    /// Stops ramping: full weight from now on.
    pub(crate) fn stop(&mut self) {
        self.from = None;
        self.factor = 0;
    }

    pub(crate) fn is_ramping(&self) -> bool {
        self.from.is_some()
    }

    /// Moves the ramp to `now`; returns whether its factor changed (or it ended), so that a
    /// new table is needed.
    pub(crate) fn step(&mut self, config: &SlowStart, now: Instant) -> bool {
        let Some(from) = self.from else {
            return false;
        };
        let elapsed = now.saturating_duration_since(from);
        if elapsed >= config.window {
            self.stop();
            return true;
        }
        let factor = config.factor(elapsed);
        let moved = factor != self.factor;
        self.factor = factor;
        moved
    }

    /// The weight factor now, in 1/[`SCALE`]ths: [`SCALE`] when not ramping.
    pub(crate) fn factor(&self, config: &SlowStart, now: Instant) -> u32 {
        self.from.map_or(SCALE, |from| {
            config.factor(now.saturating_duration_since(from))
        })
    }

    /// When the ramp next moves.
    pub(crate) fn next_step(&self, config: &SlowStart, now: Instant) -> Option<Instant> {
        let from = self.from?;
        let step = (config.window / STEPS).max(Duration::from_nanos(1));
        let elapsed = now.saturating_duration_since(from);
        let done = (elapsed.as_nanos() / step.as_nanos()) as u32;
        from.checked_add(step * done.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_is_linear_from_the_floor_by_default() {
        let slow = SlowStart::new(Duration::from_secs(100));
        assert_eq!(slow.factor(Duration::ZERO), 10);
        assert_eq!(slow.factor(Duration::from_secs(50)), 50);
        assert_eq!(slow.factor(Duration::from_secs(100)), 100);
        assert_eq!(slow.factor(Duration::from_secs(500)), 100);
        let aggressive = slow.aggression(2.0);
        assert_eq!(aggressive.factor(Duration::from_secs(25)), 50);
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(SlowStart::new(Duration::ZERO).validate().is_err());
        assert!(SlowStart::new(Duration::MAX).validate().is_err());
        let slow = SlowStart::new(Duration::from_secs(1));
        assert!(slow.validate().is_ok());
        assert!(slow.aggression(0.0).validate().is_err());
        assert!(slow.aggression(f64::NAN).validate().is_err());
        assert!(slow.min_weight_percent(0).validate().is_err());
        assert!(slow.min_weight_percent(101).validate().is_err());
    }
}
