//! HTTP-01 challenge answers: the token the ACME server will ask for at
//! `/.well-known/acme-challenge/<token>`, and the key authorization to answer with.

use std::collections::HashMap;
use std::sync::Mutex;

pub const CHALLENGE_PATH_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug, Default)]
pub struct Challenges {
    answers: Mutex<HashMap<String, String>>,
}

impl Challenges {
    pub fn add(&self, token: &str, key_authorization: &str) {
        self.lock()
            .insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove(&self, token: &str) {
        self.lock().remove(token);
    }

    /// The answer for a challenge request path, if it is one we expect.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(CHALLENGE_PATH_PREFIX)?;
        self.lock().get(token).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // Every update is a single insert or remove: a poisoned map is still consistent.
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }
}
