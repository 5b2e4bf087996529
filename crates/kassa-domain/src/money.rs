//! Money: integer minor units plus a currency, with checked arithmetic. No floats.

use crate::currency::Currency;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An amount of money in the currency's minor unit (cents for EUR, yen for JPY).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("currency mismatch: {left} and {right} cannot be combined")]
    CurrencyMismatch { left: Currency, right: Currency },
    #[error("amount overflow: the result does not fit in 64-bit minor units")]
    Overflow,
}

impl Money {
    pub const fn new(minor: i64, currency: Currency) -> Self {
        Money { minor, currency }
    }

    pub const fn zero(currency: Currency) -> Self {
        Money { minor: 0, currency }
    }

    pub fn is_positive(self) -> bool {
        self.minor > 0
    }

    fn same_currency(self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch { left: self.currency, right: other.currency })
        }
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let minor = self.minor.checked_add(other.minor).ok_or(MoneyError::Overflow)?;
        Ok(Money { minor, currency: self.currency })
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let minor = self.minor.checked_sub(other.minor).ok_or(MoneyError::Overflow)?;
        Ok(Money { minor, currency: self.currency })
    }

    pub fn checked_neg(self) -> Result<Money, MoneyError> {
        let minor = self.minor.checked_neg().ok_or(MoneyError::Overflow)?;
        Ok(Money { minor, currency: self.currency })
    }
}

impl fmt::Display for Money {
    /// `19.99 EUR`, `500 JPY`, `1.250 BHD`: exact decimal text from integers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exponent = u32::from(self.currency.exponent());
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        if exponent == 0 {
            return write!(f, "{sign}{abs} {}", self.currency);
        }
        let scale = 10u64.pow(exponent);
        write!(f, "{sign}{}.{:0width$} {}", abs / scale, abs % scale, self.currency, width = exponent as usize)
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(code: &str) -> Currency {
        Currency::from_code(code).unwrap()
    }

    #[test]
    fn displays_with_the_currency_exponent() {
        assert_eq!(Money::new(1999, cur("EUR")).to_string(), "19.99 EUR");
        assert_eq!(Money::new(5, cur("EUR")).to_string(), "0.05 EUR");
        assert_eq!(Money::new(500, cur("JPY")).to_string(), "500 JPY");
        assert_eq!(Money::new(1250, cur("BHD")).to_string(), "1.250 BHD");
        assert_eq!(Money::new(-1999, cur("USD")).to_string(), "-19.99 USD");
        assert_eq!(Money::new(i64::MIN, cur("JPY")).to_string(), "-9223372036854775808 JPY");
    }

    #[test]
    fn arithmetic_is_checked() {
        let eur = cur("EUR");
        assert_eq!(Money::new(1, eur).checked_add(Money::new(2, eur)), Ok(Money::new(3, eur)));
        assert_eq!(Money::new(i64::MAX, eur).checked_add(Money::new(1, eur)), Err(MoneyError::Overflow));
        assert_eq!(Money::new(i64::MIN, eur).checked_sub(Money::new(1, eur)), Err(MoneyError::Overflow));
        assert_eq!(Money::new(i64::MIN, eur).checked_neg(), Err(MoneyError::Overflow));
        assert!(matches!(
            Money::new(1, eur).checked_add(Money::new(1, cur("USD"))),
            Err(MoneyError::CurrencyMismatch { .. })
        ));
    }
}
