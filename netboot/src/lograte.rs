//! Rate limits for the log lines written per packet or per request.
//!
//! A flood must not fill the journal: journald drops a service's records beyond its rate limit
//! (by default 10000 per 30 s), and then the records lost are the phase changes that matter.
//! Every line a peer can cause once per packet or request goes through a [`LogLimit`] (or a
//! [`KeyedLogLimit`]); phase-change records (`MESSAGE_ID=`) never do.
//!
//! Each call site has a budget: a sustained rate of lines per second and a burst (GCRA, from
//! the `governor` crate). Lines over the budget are counted, not written. The first suppressed
//! line of a period starts a timer, and when the period ends one line (`site`, `suppressed`)
//! says how many were left out there; with no runtime to run the timer, the count waits for the
//! next suppression that has one. governor only answers yes or no, so the counting and the
//! summary line are ours.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How long suppressed lines are counted before their number is logged.
pub const REPORT_PERIOD: Duration = Duration::from_secs(10);

/// Keys a [`KeyedLogLimit`] tracks before it forgets idle ones; beyond that (after forgetting)
/// only the site's budget applies.
const MAX_KEYS: usize = 4096;

/// The suppressed-line count of one site, shared with its report timer.
#[derive(Debug)]
struct Suppressed {
    site: &'static str,
    period: Duration,
    /// Lines suppressed since the last report.
    pending: AtomicU64,
    /// Lines suppressed since the start.
    total: AtomicU64,
    /// A report timer is running.
    timer: AtomicBool,
}

impl Suppressed {
    fn count(self: &Arc<Self>) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        if self.timer.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No timer without a runtime: the next suppression tries again.
            self.timer.store(false, Ordering::Release);
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(this.period).await;
            // Cleared before taking the count: a line suppressed in between starts a new
            // timer, and is counted by this report or by that one, never lost.
            this.timer.store(false, Ordering::Release);
            this.report();
        });
    }

    fn report(&self) {
        let n = self.pending.swap(0, Ordering::AcqRel);
        if n > 0 {
            tracing::warn!(
                site = self.site,
                suppressed = n,
                period_s = self.period.as_secs(),
                "{n} log lines suppressed by the rate limit ({})",
                self.site
            );
        }
    }
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nonzero(per_second)).allow_burst(nonzero(burst))
}

/// The log budget of one call site (see the module documentation).
#[derive(Debug)]
pub struct LogLimit {
    limiter: DefaultDirectRateLimiter,
    suppressed: Arc<Suppressed>,
}

impl LogLimit {
    /// `per_second` lines on average, up to `burst` at once (both at least 1); `site` names the
    /// lines in the summary.
    pub fn new(site: &'static str, per_second: u32, burst: u32) -> LogLimit {
        LogLimit::with_period(site, per_second, burst, REPORT_PERIOD)
    }

    /// [`LogLimit::new`] with another report period.
    pub fn with_period(
        site: &'static str,
        per_second: u32,
        burst: u32,
        period: Duration,
    ) -> LogLimit {
        LogLimit {
            limiter: RateLimiter::direct(quota(per_second, burst)),
            suppressed: Arc::new(Suppressed {
                site,
                period,
                pending: AtomicU64::new(0),
                total: AtomicU64::new(0),
                timer: AtomicBool::new(false),
            }),
        }
    }

    /// Whether a line may be written now; if not, it is counted as suppressed.
    pub fn allow(&self) -> bool {
        if self.limiter.check().is_ok() {
            return true;
        }
        self.suppressed.count();
        false
    }

    /// Lines suppressed at this site since it was made.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed.total.load(Ordering::Relaxed)
    }

    /// Logs the count of lines suppressed since the last report now (shutdown, tests).
    pub fn report_now(&self) {
        self.suppressed.report();
    }
}

/// A [`LogLimit`] plus a budget per key (e.g. a machine's MAC), so that a flood about one key
/// does not use up the lines of the others. A line is written when both budgets allow it.
#[derive(Debug)]
pub struct KeyedLogLimit<K: Hash + Eq + Clone> {
    site: LogLimit,
    per_key: DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone> KeyedLogLimit<K> {
    /// `key_rate`/`key_burst` per key, `site_rate`/`site_burst` for the site as a whole.
    pub fn new(
        site: &'static str,
        key_rate: u32,
        key_burst: u32,
        site_rate: u32,
        site_burst: u32,
    ) -> KeyedLogLimit<K> {
        KeyedLogLimit {
            site: LogLimit::new(site, site_rate, site_burst),
            per_key: RateLimiter::keyed(quota(key_rate, key_burst)),
        }
    }

    /// Whether a line about `key` may be written now; if not, it is counted as suppressed.
    pub fn allow(&self, key: &K) -> bool {
        if self.per_key.len() >= MAX_KEYS {
            self.per_key.retain_recent();
        }
        let key_ok = self.per_key.len() >= MAX_KEYS || self.per_key.check_key(key).is_ok();
        if key_ok {
            return self.site.allow();
        }
        self.site.suppressed.count();
        false
    }

    /// Lines suppressed at this site since it was made.
    pub fn suppressed_total(&self) -> u64 {
        self.site.suppressed_total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most lines a budget of `rate`/s and `burst` lets through in `elapsed`.
    fn most(rate: u64, burst: u64, elapsed: std::time::Duration) -> usize {
        (burst + rate * (elapsed.as_secs() + 1)) as usize
    }

    #[test]
    fn a_burst_then_suppression_counted() {
        let limit = LogLimit::new("test", 1, 5);
        let started = std::time::Instant::now();
        let allowed = (0..100).filter(|_| limit.allow()).count();
        let elapsed = started.elapsed();
        assert!(allowed >= 5, "the burst gets through: {allowed}");
        assert!(allowed <= most(1, 5, elapsed), "{allowed} in {elapsed:?}");
        assert_eq!(limit.suppressed_total(), 100 - allowed as u64);
    }

    #[test]
    fn keys_have_their_own_budget() {
        let limit: KeyedLogLimit<u8> = KeyedLogLimit::new("test", 1, 2, 1000, 1000);
        let started = std::time::Instant::now();
        let flood = (0..50).filter(|_| limit.allow(&1)).count();
        let elapsed = started.elapsed();
        assert!(
            flood >= 2 && flood <= most(1, 2, elapsed),
            "{flood} in {elapsed:?}"
        );
        assert!(limit.allow(&2), "another key still gets its lines");
        assert!(limit.allow(&2));
        assert_eq!(limit.suppressed_total(), 50 - flood as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_is_reported_when_the_period_ends() {
        let limit = LogLimit::with_period("test", 1, 1, Duration::from_secs(10));
        assert!(limit.allow());
        for _ in 0..7 {
            assert!(!limit.allow());
        }
        assert_eq!(limit.suppressed.pending.load(Ordering::Relaxed), 7);
        assert!(limit.suppressed.timer.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_secs(11)).await;
        // The report took the count and the timer is free for the next period.
        assert_eq!(limit.suppressed.pending.load(Ordering::Relaxed), 0);
        assert!(!limit.suppressed.timer.load(Ordering::Relaxed));
        assert_eq!(limit.suppressed_total(), 7);
    }
}
