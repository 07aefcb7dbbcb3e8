//! When each name is resolved: at once, then as its TTL runs out (within a floor and a cap),
//! and after a failure with exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;

use super::error::{DnsError, DnsErrorKind};
use super::resolve::{resolve, Answer, Query, Resolve};
use crate::util::rng::FastRng;

/// The timing settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Timing {
    pub(super) ttl_floor: Duration,
    pub(super) ttl_cap: Duration,
    pub(super) backoff_initial: Duration,
    pub(super) backoff_max: Duration,
    pub(super) timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ttl_floor: Duration::from_secs(5),
            ttl_cap: Duration::from_secs(300),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Timing {
    /// When to resolve again after a good answer with `ttl`.
    pub(super) fn after_answer(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.ttl_floor, self.ttl_cap)
    }

    /// When to resolve again after the `failures`-th failure in a row (from 1): the initial
    /// backoff doubled per failure, at most the maximum, then a random share of it between a
    /// half and all of it, so clients that failed together do not retry together.
    pub(super) fn after_failure(&self, failures: u32, rng: &mut FastRng) -> Duration {
        let doubled = self
            .backoff_initial
            .saturating_mul(1 << failures.clamp(1, 31).saturating_sub(1));
        let ceiling = doubled.min(self.backoff_max);
        let share = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ceiling / 2 + (ceiling / 2).mul_f64(share)
    }
}

/// One resolution's outcome, with the time until the next.
#[derive(Debug)]
pub(super) enum Outcome {
    Answer(Answer, Duration),
    Failed(DnsError, Duration),
}

/// The resolutions of one name, forever: the first at once, each next one after the delay the
/// previous outcome set. An IP address given as a name is answered once.
pub(super) fn refresh(
    query: Query,
    resolver: Arc<dyn Resolve>,
    timing: Timing,
) -> impl Stream<Item = Outcome> + Send {
    struct State {
        query: Query,
        resolver: Arc<dyn Resolve>,
        timing: Timing,
        rng: FastRng,
        failures: u32,
        wait: Option<Duration>,
    }
    let state = State {
        query,
        resolver,
        timing,
        rng: FastRng::new(),
        failures: 0,
        wait: None,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        match state.wait {
            // Nothing will change: an address literal.
            Some(Duration::MAX) => std::future::pending::<()>().await,
            Some(wait) => tokio::time::sleep(wait).await,
            None => {}
        }
        let resolution = resolve(&*state.resolver, &state.query);
        let outcome = match tokio::time::timeout(state.timing.timeout, resolution).await {
            Ok(Ok(answer)) => {
                state.failures = 0;
                let next = match answer.ttl {
                    Duration::MAX => Duration::MAX,
                    ttl => state.timing.after_answer(ttl),
                };
                Outcome::Answer(answer, next)
            }
            Ok(Err(error)) => {
                state.failures = state.failures.saturating_add(1);
                let next = state.timing.after_failure(state.failures, &mut state.rng);
                Outcome::Failed(error, next)
            }
            Err(_elapsed) => {
                state.failures = state.failures.saturating_add(1);
                let next = state.timing.after_failure(state.failures, &mut state.rng);
                let error =
                    DnsError::new(state.query.given().clone(), DnsErrorKind::TimedOut, None);
                Outcome::Failed(error, next)
            }
        };
        state.wait = Some(match &outcome {
            Outcome::Answer(_, next) | Outcome::Failed(_, next) => *next,
        });
        Some((outcome, state))
    })
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use tokio::time::Instant;

    use super::super::resolve::fake::*;
    use super::*;

    /// Runs `name`'s refresh for `run` of paused time and returns when it was queried.
    async fn queried_at(
        fake: &Arc<FakeResolver>,
        name: &str,
        timing: Timing,
        run: Duration,
    ) -> Vec<Duration> {
        let start = Instant::now();
        let mut outcomes = Box::pin(refresh(host(name), fake.clone(), timing));
        let _ = tokio::time::timeout(run, async { while outcomes.next().await.is_some() {} }).await;
        fake.times(name, start)
    }

    fn secs(s: &[u64]) -> Vec<Duration> {
        s.iter().map(|&s| Duration::from_secs(s)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_is_resolved_again_when_its_ttl_runs_out() {
        let fake = Arc::new(FakeResolver::default());
        fake.script("api.test", vec![ips(&["10.0.0.1"], 30)]);
        let at = queried_at(
            &fake,
            "api.test",
            Timing::default(),
            Duration::from_secs(100),
        )
        .await;
        assert_eq!(at, secs(&[0, 30, 60, 90]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_ttl_waits_for_the_floor_and_a_long_one_for_the_cap() {
        let fake = Arc::new(FakeResolver::default());
        fake.script("zero.test", vec![ips(&["10.0.0.1"], 0)]);
        fake.script("day.test", vec![ips(&["10.0.0.1"], 86_400)]);
        fake.script("week.test", vec![ips(&["10.0.0.1"], 604_800)]);
        let timing = Timing::default();
        let zero = queried_at(&fake, "zero.test", timing, Duration::from_secs(12)).await;
        assert_eq!(zero, secs(&[0, 5, 10]), "TTL 0 is held to the 5 s floor");
        let day = queried_at(&fake, "day.test", timing, Duration::from_secs(700)).await;
        assert_eq!(
            day,
            secs(&[0, 300, 600]),
            "a day's TTL is cut to the 5 min cap"
        );

        let custom = Timing {
            ttl_floor: Duration::from_secs(1),
            ttl_cap: Duration::from_secs(2),
            ..timing
        };
        let at = queried_at(&fake, "week.test", custom, Duration::from_secs(5)).await;
        assert_eq!(at, secs(&[0, 2, 4]));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_with_jitter_and_a_success_resets_it() {
        let fake = Arc::new(FakeResolver::default());
        let mut script = vec![Scripted::Fail; 7];
        script.push(ips(&["10.0.0.1"], 60));
        script.push(Scripted::Fail);
        script.push(ips(&["10.0.0.1"], 60));
        fake.script("api.test", script);
        let at = queried_at(
            &fake,
            "api.test",
            Timing::default(),
            Duration::from_secs(170),
        )
        .await;
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // Ceilings 1, 2, 4, 8, 16, 30, 30 s after the 1st..7th failure; each gap is between
        // half the ceiling and all of it.
        for (gap, ceiling) in gaps.iter().zip([1, 2, 4, 8, 16, 30, 30]) {
            let ceiling = Duration::from_secs(ceiling);
            assert!(*gap >= ceiling / 2 && *gap <= ceiling, "{gaps:?}");
        }
        assert_eq!(
            gaps[7],
            Duration::from_secs(60),
            "after a success, the TTL again"
        );
        assert!(
            gaps[8] <= Duration::from_secs(1),
            "the backoff started over: {gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_resolution_that_hangs_times_out_and_counts_as_a_failure() {
        let fake = Arc::new(FakeResolver::default());
        fake.script("api.test", vec![Scripted::Hang, ips(&["10.0.0.1"], 60)]);
        let start = Instant::now();
        let mut outcomes = Box::pin(refresh(host("api.test"), fake.clone(), Timing::default()));
        match outcomes.next().await.unwrap() {
            Outcome::Failed(error, retry) => {
                assert_eq!(error.kind(), DnsErrorKind::TimedOut);
                assert!(retry <= Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(10),
            "the default timeout"
        );
        assert!(matches!(
            outcomes.next().await.unwrap(),
            Outcome::Answer(..)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_given_as_a_name_is_answered_once_and_never_queried() {
        let fake = Arc::new(FakeResolver::default());
        let literal = Query::Literal {
            given: "10.0.0.9:80".into(),
            addr: "10.0.0.9:80".parse().unwrap(),
        };
        let mut outcomes = Box::pin(refresh(literal, fake.clone(), Timing::default()));
        assert!(matches!(
            outcomes.next().await.unwrap(),
            Outcome::Answer(..)
        ));
        let next = tokio::time::timeout(Duration::from_secs(3600), outcomes.next()).await;
        assert!(next.is_err(), "nothing more");
        assert!(fake.queries.lock().unwrap().is_empty());
    }
}
