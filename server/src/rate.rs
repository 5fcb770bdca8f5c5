//! Rate limits: a token bucket holding at most one second of its rate, refilled as time
//! passes. Pure arithmetic on a time the caller passes (milliseconds): no clock, no I/O, no
//! locks, so the dispatcher (a listener's deliveries per second) and the trigger path (a
//! producer's triggers per second) each keep their buckets where they already keep state.

/// A token bucket: `rate` tokens a second, at most `rate` saved up (one second's burst).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    rate: u32,
    /// Tokens at `at_ms`.
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    /// A full bucket of `rate` a second (`rate` ≥ 1).
    pub fn new(rate: u32, now_ms: u64) -> Self {
        let rate = rate.max(1);
        Self { rate, tokens: f64::from(rate), at_ms: now_ms }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Tokens there would be at `now_ms`.
    fn tokens_at(&self, now_ms: u64) -> f64 {
        let refill = now_ms.saturating_sub(self.at_ms) as f64 * f64::from(self.rate) / 1000.0;
        (self.tokens + refill).min(f64::from(self.rate))
    }

    /// Whether a token is there at `now_ms`.
    pub fn allows(&self, now_ms: u64) -> bool {
        self.tokens_at(now_ms) >= 1.0
    }

    /// Takes a token if there is one; otherwise says in how many milliseconds there will be.
    pub fn take(&mut self, now_ms: u64) -> Result<(), u64> {
        let tokens = self.tokens_at(now_ms);
        if tokens >= 1.0 {
            self.tokens = tokens - 1.0;
            self.at_ms = self.at_ms.max(now_ms);
            Ok(())
        } else {
            Err(self.wait_ms(now_ms))
        }
    }

    /// Milliseconds from `now_ms` until a token is there (0 when one is).
    pub fn wait_ms(&self, now_ms: u64) -> u64 {
        let missing = 1.0 - self.tokens_at(now_ms);
        if missing <= 0.0 { 0 } else { (missing * 1000.0 / f64::from(self.rate)).ceil() as u64 }
    }

    /// Whether a whole second's worth is saved up at `now_ms`: the bucket is as if new.
    pub fn is_full(&self, now_ms: u64) -> bool {
        self.tokens_at(now_ms) >= f64::from(self.rate)
    }

    /// Takes a new rate, keeping what is saved up (within the new second's worth).
    pub fn set_rate(&mut self, rate: u32, now_ms: u64) {
        let tokens = self.tokens_at(now_ms);
        self.rate = rate.max(1);
        self.tokens = tokens.min(f64::from(self.rate));
        self.at_ms = self.at_ms.max(now_ms);
    }
}

/// Buckets by key (a producer's id), all at one rate, behind one lock held for a few
/// arithmetic steps. At most [`MAX_KEYS`] are kept: beyond that, full buckets (keys quiet for
/// a second or more, which a fresh bucket would treat alike) are dropped.
#[derive(Debug)]
pub struct Limiter {
    rate: u32,
    buckets: std::sync::Mutex<std::collections::HashMap<String, Bucket>>,
}

/// Keys a [`Limiter`] keeps before it drops full buckets.
pub const MAX_KEYS: usize = 10_000;

impl Limiter {
    /// A limiter of `rate` a second per key.
    pub fn new(rate: u32) -> Self {
        Self { rate: rate.max(1), buckets: std::sync::Mutex::default() }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Takes a token of `key`'s bucket, or says in how many milliseconds there will be one.
    pub fn take(&self, key: &str, now_ms: u64) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !buckets.contains_key(key) && buckets.len() >= MAX_KEYS {
            buckets.retain(|_, bucket| !bucket.is_full(now_ms));
        }
        buckets.entry(key.to_owned()).or_insert_with(|| Bucket::new(self.rate, now_ms)).take(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limiter_keeps_one_bucket_per_key() {
        let limiter = Limiter::new(1);
        assert_eq!(limiter.take("prd_a", 0), Ok(()));
        assert_eq!(limiter.take("prd_a", 0), Err(1000));
        assert_eq!(limiter.take("prd_b", 0), Ok(()), "another key has its own bucket");
        assert_eq!(limiter.take("prd_a", 1000), Ok(()));
    }

    #[test]
    fn a_limiter_forgets_quiet_keys_once_it_holds_many() {
        let limiter = Limiter::new(1);
        for n in 0..MAX_KEYS {
            limiter.take(&format!("prd_{n}"), 0).unwrap();
        }
        // A second later every bucket is full again: the next new key drops them all.
        limiter.take("prd_new", 1000).unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
        // Spent buckets are kept: forgetting one would grant a fresh burst.
        for n in 0..MAX_KEYS {
            limiter.take(&format!("prd_{n}"), 2000).unwrap();
        }
        limiter.take("prd_other", 2000).unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), MAX_KEYS + 1);
    }

    #[test]
    fn a_full_second_bursts_then_the_rate_holds() {
        let mut bucket = Bucket::new(5, 1_000);
        for _ in 0..5 {
            assert_eq!(bucket.take(1_000), Ok(()));
        }
        assert_eq!(bucket.take(1_000), Err(200), "one token every 200 ms at 5 a second");
        assert!(!bucket.allows(1_199));
        assert!(bucket.allows(1_200));
        assert_eq!(bucket.take(1_200), Ok(()));
        assert_eq!(bucket.wait_ms(1_200), 200);
    }

    #[test]
    fn saving_up_stops_at_one_second() {
        let mut bucket = Bucket::new(10, 0);
        for _ in 0..10 {
            bucket.take(0).unwrap();
        }
        // An hour idle saves up ten tokens, not thirty-six thousand.
        let later = 3_600_000;
        let taken = (0..100).take_while(|_| bucket.take(later).is_ok()).count();
        assert_eq!(taken, 10);
    }

    #[test]
    fn time_going_backwards_takes_nothing_away() {
        let mut bucket = Bucket::new(2, 10_000);
        bucket.take(10_000).unwrap();
        bucket.take(10_000).unwrap();
        assert!(!bucket.allows(9_000), "an earlier time refills nothing");
        assert_eq!(bucket.wait_ms(9_000), 500);
    }

    #[test]
    fn a_new_rate_keeps_what_was_saved_within_its_second() {
        let mut bucket = Bucket::new(100, 0);
        bucket.set_rate(3, 0);
        let taken = (0..10).take_while(|_| bucket.take(0).is_ok()).count();
        assert_eq!(taken, 3);
        assert_eq!(bucket.rate(), 3);
        bucket.set_rate(0, 0);
        assert_eq!(bucket.rate(), 1, "a rate is at least one a second");
    }
}
