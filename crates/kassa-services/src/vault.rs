//! Card data between accepting a payment and authorizing it: in memory only,
//! never written anywhere in clear (between processes it travels sealed, see
//! [`crate::seal`]). A crash loses it, and a payment whose card is gone before
//! it could be authorized is declined `card_data_unavailable` — one clear
//! outcome rather than a card number on disk.

use kassa_domain::{CardDetails, PaymentId};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug)]
pub struct CardVault {
    cards: Mutex<HashMap<PaymentId, CardDetails>>,
    cards_max: usize,
}

/// The vault holds `cards_max` cards already: shed load (429 `overloaded`) rather than grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many payments waiting for authorization; retry shortly")]
pub struct VaultFull;

impl CardVault {
    pub fn new(cards_max: usize) -> Self {
        CardVault { cards: Mutex::new(HashMap::new()), cards_max }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PaymentId, CardDetails>> {
        self.cards.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn put(&self, payment_id: PaymentId, card: CardDetails) -> Result<(), VaultFull> {
        let mut cards = self.lock();
        if cards.len() >= self.cards_max {
            return Err(VaultFull);
        }
        cards.insert(payment_id, card);
        Ok(())
    }

    /// Whether the vault holds the card, without copying it.
    pub fn contains(&self, payment_id: PaymentId) -> bool {
        self.lock().contains_key(&payment_id)
    }

    pub fn get(&self, payment_id: PaymentId) -> Option<CardDetails> {
        self.lock().get(&payment_id).cloned()
    }

    /// Forget a card once its payment no longer needs an authorization.
    /// Whether the vault held it.
    pub fn remove(&self, payment_id: PaymentId) -> bool {
        self.lock().remove(&payment_id).is_some()
    }

    /// Forget the cards of the payments `drop` picks (a partition that moved
    /// to another instance). How many were forgotten.
    pub fn forget(&self, drop: impl Fn(PaymentId) -> bool) -> usize {
        let mut cards = self.lock();
        let before = cards.len();
        cards.retain(|payment_id, _| !drop(*payment_id));
        before - cards.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
