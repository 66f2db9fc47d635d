//! TLS session tickets: what a returning client hands back to skip the certificate and
//! signature of a full handshake. Sealed with AES-256-GCM under a key that lives only in
//! memory and is replaced every 6 hours (the previous key still opens tickets for another 6),
//! as rustls's own ticketers do.
//!
//! Ours rather than aws-lc-rs's ticketer in rustls: that one follows RFC 5077's example
//! construction (AES-CBC and HMAC) and prepares both keys again for every ticket, which made a
//! resumed handshake cost almost as much CPU as a full one. Here the key is prepared once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// How long one key seals new tickets; tickets it sealed are opened for as long again.
const KEY_ROTATION_SECONDS: u32 = 6 * 60 * 60;

/// How long a client may keep a ticket (told it with the ticket): as long as the key that
/// sealed it still opens tickets.
const TICKET_LIFETIME_SECONDS: u32 = 2 * KEY_ROTATION_SECONDS;

/// Tickets under rotating keys, for every listener and worker to share.
pub(crate) fn rotating() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    let rotator =
        rustls::TicketRotator::new(KEY_ROTATION_SECONDS, || Ok(Box::new(SealedTickets::new()?)))?;
    Ok(Arc::new(rotator))
}

/// Tickets sealed under one key: `key name ‖ nonce ‖ ciphertext ‖ tag`. The key name tells
/// this key's tickets from the previous key's at once; it is also authenticated (the AAD).
struct SealedTickets {
    key: RandomizedNonceKey,
    key_name: [u8; 16],
    /// The longest ticket sealed so far: anything longer was not ours, and is refused
    /// before any work is spent on it.
    longest: AtomicUsize,
}

impl SealedTickets {
    fn new() -> Result<Self, rustls::crypto::GetRandomFailed> {
        let random = SystemRandom::new();
        let mut key = [0u8; 32];
        let mut key_name = [0u8; 16];
        random
            .fill(&mut key)
            .and_then(|()| random.fill(&mut key_name))
            .map_err(|_| rustls::crypto::GetRandomFailed)?;
        let key = RandomizedNonceKey::new(&AES_256_GCM, &key)
            .map_err(|_| rustls::crypto::GetRandomFailed)?;
        Ok(Self {
            key,
            key_name,
            longest: AtomicUsize::new(0),
        })
    }
}

impl std::fmt::Debug for SealedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SealedTickets").finish_non_exhaustive()
    }
}

impl ProducesTickets for SealedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME_SECONDS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let tag_len = AES_256_GCM.tag_len();
        let header = self.key_name.len() + NONCE_LEN;
        // Sealed where it lies in the ticket: one buffer, one copy of the state.
        let mut ticket = Vec::with_capacity(header + plain.len() + tag_len);
        ticket.extend_from_slice(&self.key_name);
        ticket.resize(header, 0);
        ticket.extend_from_slice(plain);
        let (nonce, tag) = self
            .key
            .seal_in_place_separate_tag(Aad::from(&self.key_name), &mut ticket[header..])
            .ok()?;
        ticket[self.key_name.len()..header].copy_from_slice(nonce.as_ref());
        ticket.extend_from_slice(tag.as_ref());
        self.longest.fetch_max(ticket.len(), Ordering::Relaxed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() > self.longest.load(Ordering::Relaxed) {
            return None;
        }
        let (key_name, rest) = ticket.split_at_checked(self.key_name.len())?;
        // The key name travels in the clear in every ticket: comparing it needs no constant
        // time. A ticket under another key (the previous one, another server's) stops here.
        if key_name != self.key_name {
            return None;
        }
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut plain = sealed.to_vec();
        let length = self
            .key
            .open_in_place(nonce, Aad::from(key_name), &mut plain)
            .ok()?
            .len();
        plain.truncate(length);
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_to_what_was_sealed() {
        let tickets = SealedTickets::new().unwrap();
        let ticket = tickets.encrypt(b"session state").unwrap();
        assert_eq!(ticket.len(), 16 + NONCE_LEN + 13 + 16);
        assert_eq!(
            tickets.decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
        // A fresh nonce each time: the same state never seals to the same ticket.
        assert_ne!(tickets.encrypt(b"session state").unwrap(), ticket);
    }

    #[test]
    fn altered_foreign_and_overlong_tickets_are_refused() {
        let tickets = SealedTickets::new().unwrap();
        let ticket = tickets.encrypt(b"session state").unwrap();
        for at in [0, 16, 16 + NONCE_LEN, ticket.len() - 1] {
            let mut altered = ticket.clone();
            altered[at] ^= 1;
            assert_eq!(tickets.decrypt(&altered), None, "byte {at} altered");
        }
        let other = SealedTickets::new().unwrap();
        let foreign = other.encrypt(b"session state").unwrap();
        assert_eq!(tickets.decrypt(&foreign), None);
        let mut overlong = ticket.clone();
        overlong.push(0);
        assert_eq!(tickets.decrypt(&overlong), None);
        assert_eq!(tickets.decrypt(&ticket[..20]), None);
        assert_eq!(tickets.decrypt(&[]), None);
    }

    #[test]
    fn the_rotating_ticketer_opens_its_own_tickets() {
        let tickets = rotating().unwrap();
        assert!(tickets.enabled());
        assert_eq!(tickets.lifetime(), TICKET_LIFETIME_SECONDS);
        let ticket = tickets.encrypt(b"state").unwrap();
        assert_eq!(tickets.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
    }
}
