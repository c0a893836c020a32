//! When to say that a service refuses this client (its credentials, its certificate, an authorization): once when
//! it starts, again when the cause changes or every [`REPEAT`] while it lasts, and once when it is over. The
//! clients retry on their own many times a minute; the log says the cause, not every attempt.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a lasting refusal is said again.
pub const REPEAT: Duration = Duration::from_secs(300);

/// What one service refuses now, and when that was last said.
#[derive(Debug, Default)]
pub struct Refusals {
    current: Mutex<Option<(&'static str, Instant)>>,
}

impl Refusals {
    /// The service refuses `what` now; true when that is to be said.
    pub fn note(&self, what: &'static str) -> bool {
        self.note_at(what, Instant::now())
    }

    fn note_at(&self, what: &'static str, now: Instant) -> bool {
        let mut current = crate::lock(&self.current);
        let say = current.is_none_or(|(was, at)| was != what || now.duration_since(at) >= REPEAT);
        if say {
            *current = Some((what, now));
        }
        say
    }

    /// The service works again: what it refused, if it refused anything until now.
    pub fn clear(&self) -> Option<&'static str> {
        crate::lock(&self.current).take().map(|(what, _)| what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn said_once_then_again_when_the_cause_changes_or_after_the_interval() {
        let r = Refusals::default();
        let t0 = Instant::now();
        assert!(r.note_at("credentials", t0));
        assert!(!r.note_at("credentials", t0 + Duration::from_secs(1)));
        assert!(!r.note_at("credentials", t0 + REPEAT - Duration::from_secs(1)));
        assert!(r.note_at("credentials", t0 + REPEAT));
        assert!(r.note_at("topic authorization", t0 + REPEAT + Duration::from_secs(1)));
        assert_eq!(r.clear(), Some("topic authorization"));
        assert_eq!(r.clear(), None);
        assert!(r.note_at("topic authorization", t0 + REPEAT + Duration::from_secs(2)));
    }
}
