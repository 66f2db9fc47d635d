//! Canary rollouts: which requests go to a service's rollout targets instead of its main ones.
//!
//! As in kamal-proxy, the choice rests on the `kamal-rollout` cookie, which the app sets (to
//! an account or visitor id, say): a value on the allowlist always goes to the rollout, and
//! any other value goes there when its FNV-1a hash falls in the first `percent` of the hash
//! space. The same value always lands on the same side, so a user stays on one version.
//! Requests without the cookie stay on the main targets.

use http::{header, HeaderMap};
use serde::{Deserialize, Serialize};

/// The cookie whose value decides.
pub const ROLLOUT_COOKIE: &str = "kamal-rollout";

/// How traffic is split between a service's main and rollout targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSplit {
    /// Share of cookie values sent to the rollout, 0 to 100.
    pub percent: u8,
    /// Cookie values always sent to the rollout.
    #[serde(default)]
    pub allowlist: Vec<String>,
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
        Ok(Self { percent, allowlist })
    }

    /// Whether a request with these headers goes to the rollout targets.
    pub fn selects(&self, headers: &HeaderMap) -> bool {
        let Some(value) = rollout_cookie(headers) else {
            return false;
        };
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
    fn percent_over_100_is_refused() {
        assert!(RolloutSplit::new(101, vec![]).is_err());
    }
}
