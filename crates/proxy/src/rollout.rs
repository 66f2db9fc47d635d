//! Canary rollouts: which requests go to a service's rollout targets instead of its main ones.
//!
//! As in kamal-proxy, the choice rests on the `kamal-rollout` cookie, which the app may set
//! (to an account id, say): a value on the allowlist always goes to the rollout, and any other
//! value goes there when its FNV-1a hash falls in the first `percent` of the hash space. The
//! same value always lands on the same side, so a user stays on one version.
//!
//! A request without the cookie goes to the main targets, as in kamal-proxy, so responses
//! to anonymous visitors (public, cacheable pages) carry no cookie. With `assign_cookies`
//! (`rollout set --assign-cookies`, Berth's own), such a visitor instead gets a new random
//! value while a percentage is set, is routed by it like any other, and the response sets the
//! cookie, so the percentage applies to all traffic and each visitor stays on its side.

use http::{header, HeaderMap};
use serde::{Deserialize, Serialize};

/// The cookie whose value decides.
pub const ROLLOUT_COOKIE: &str = "kamal-rollout";
/// How long the cookie given to an anonymous visitor lasts: longer than a rollout.
const ASSIGNED_COOKIE_MAX_AGE_SECS: u32 = 30 * 24 * 60 * 60;

/// Which side a request goes to, and the cookie to give a visitor who had none.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub rollout: bool,
    /// A `Set-Cookie` value for the response.
    pub set_cookie: Option<String>,
}

/// How traffic is split between a service's main and rollout targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSplit {
    /// Share of cookie values sent to the rollout, 0 to 100.
    pub percent: u8,
    /// Cookie values always sent to the rollout.
    #[serde(default)]
    pub allowlist: Vec<String>,
    /// Give visitors without the cookie a random one (opt-in; kamal-proxy never does).
    #[serde(default)]
    pub assign_cookies: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("percent must be between 0 and 100, not {0}")]
pub struct InvalidPercent(pub u32);

impl RolloutSplit {
    pub fn new(percent: u32, allowlist: Vec<String>) -> Result<Self, InvalidPercent> {
        let percent = u8::try_from(percent)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or(InvalidPercent(percent))?;
        Ok(Self {
            percent,
            allowlist,
            assign_cookies: false,
        })
    }

    /// Which side a request with these headers goes to.
    pub fn assign(&self, headers: &HeaderMap) -> Assignment {
        if let Some(value) = rollout_cookie(headers) {
            return Assignment {
                rollout: self.selects_value(value),
                set_cookie: None,
            };
        }
        if self.percent == 0 || !self.assign_cookies {
            return Assignment::default();
        }
        let mut buffer = uuid::Uuid::encode_buffer();
        let value = uuid::Uuid::new_v4().simple().encode_lower(&mut buffer);
        Assignment {
            rollout: self.selects_value(value),
            set_cookie: Some(format!(
                "{ROLLOUT_COOKIE}={value}; Path=/; Max-Age={ASSIGNED_COOKIE_MAX_AGE_SECS}; HttpOnly; SameSite=Lax"
            )),
        }
    }

    /// Whether a request with these headers goes to the rollout targets.
    pub fn selects(&self, headers: &HeaderMap) -> bool {
        rollout_cookie(headers).is_some_and(|value| self.selects_value(value))
    }

    fn selects_value(&self, value: &str) -> bool {
        if self.allowlist.iter().any(|allowed| allowed == value) {
            return true;
        }
        // Zero means nobody, even a value that hashes to zero.
        self.percent > 0
            && u64::from(fnv1a(value.as_bytes())) * 100
                <= u64::from(u32::MAX) * u64::from(self.percent)
    }
}

/// The value of the rollout cookie, from any `Cookie` header.
fn rollout_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == ROLLOUT_COOKIE).then(|| value.trim_matches('"'))
        })
        .filter(|value| !value.is_empty())
}

/// 32-bit FNV-1a, the hash kamal-proxy splits on, so a value lands on the same side in both.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_cookie(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        headers
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn allowlisted_values_always_and_missing_cookies_never_select_the_rollout() {
        let split = RolloutSplit::new(0, vec!["staff".into()]).unwrap();
        assert!(split.selects(&with_cookie("theme=dark; kamal-rollout=staff")));
        assert!(!split.selects(&with_cookie("kamal-rollout=someone")));
        assert!(!split.selects(&HeaderMap::new()));
        let everyone = RolloutSplit::new(100, vec![]).unwrap();
        assert!(everyone.selects(&with_cookie("kamal-rollout=someone")));
        assert!(!everyone.selects(&with_cookie("other=1")));
    }

    #[test]
    fn a_percentage_selects_about_that_share_of_values() {
        let split = RolloutSplit::new(25, vec![]).unwrap();
        let selected = (0..10_000)
            .filter(|i| split.selects(&with_cookie(&format!("kamal-rollout=visitor-{i}"))))
            .count();
        assert!((2_300..2_700).contains(&selected), "{selected}");
    }

    #[test]
    fn anonymous_visitors_go_to_the_main_targets_without_a_cookie_as_in_kamal_proxy() {
        let split = RolloutSplit::new(100, vec![]).unwrap();
        for _ in 0..100 {
            assert_eq!(split.assign(&HeaderMap::new()), Assignment::default());
        }
    }

    #[test]
    fn with_assign_cookies_anonymous_visitors_get_a_cookie_that_keeps_them_on_their_side() {
        let mut split = RolloutSplit::new(25, vec![]).unwrap();
        split.assign_cookies = true;
        let mut to_rollout = 0;
        for _ in 0..2_000 {
            let assignment = split.assign(&HeaderMap::new());
            let cookie = assignment.set_cookie.expect("a new visitor gets a cookie");
            let pair = cookie.split(';').next().unwrap();
            assert_eq!(split.assign(&with_cookie(pair)).rollout, assignment.rollout);
            assert_eq!(split.assign(&with_cookie(pair)).set_cookie, None);
            to_rollout += usize::from(assignment.rollout);
        }
        assert!((380..620).contains(&to_rollout), "{to_rollout}");
        let mut allowlist_only = RolloutSplit::new(0, vec!["staff".into()]).unwrap();
        allowlist_only.assign_cookies = true;
        assert_eq!(
            allowlist_only.assign(&HeaderMap::new()),
            Assignment::default()
        );
    }

    #[test]
    fn percent_over_100_is_refused() {
        assert!(RolloutSplit::new(101, vec![]).is_err());
    }
}
