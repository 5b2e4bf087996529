//! ISO 4217 currencies with their real minor-unit exponents.
//!
//! The table holds the active list (funds codes included, precious metals and
//! testing codes left out because they have no minor unit). It is sorted by code
//! so lookup is a binary search; a unit test keeps it sorted and free of duplicates.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// One row of the ISO 4217 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrencyInfo {
    pub code: &'static str,
    pub numeric: u16,
    /// Digits after the decimal point: JPY 0, EUR 2, BHD 3, CLF 4.
    pub exponent: u8,
}

macro_rules! table {
    ($(($code:literal, $num:literal, $exp:literal)),* $(,)?) => {
        &[$(CurrencyInfo { code: $code, numeric: $num, exponent: $exp }),*]
    };
}

/// ISO 4217 active codes, sorted by code.
pub static CURRENCIES: &[CurrencyInfo] = table![
    ("AED", 784, 2),
    ("AFN", 971, 2),
    ("ALL", 8, 2),
    ("AMD", 51, 2),
    ("ANG", 532, 2),
    ("AOA", 973, 2),
    ("ARS", 32, 2),
    ("AUD", 36, 2),
    ("AWG", 533, 2),
    ("AZN", 944, 2),
    ("BAM", 977, 2),
    ("BBD", 52, 2),
    ("BDT", 50, 2),
    ("BGN", 975, 2),
    ("BHD", 48, 3),
    ("BIF", 108, 0),
    ("BMD", 60, 2),
    ("BND", 96, 2),
    ("BOB", 68, 2),
    ("BOV", 984, 2),
    ("BRL", 986, 2),
    ("BSD", 44, 2),
    ("BTN", 64, 2),
    ("BWP", 72, 2),
    ("BYN", 933, 2),
    ("BZD", 84, 2),
    ("CAD", 124, 2),
    ("CDF", 976, 2),
    ("CHE", 947, 2),
    ("CHF", 756, 2),
    ("CHW", 948, 2),
    ("CLF", 990, 4),
    ("CLP", 152, 0),
    ("CNY", 156, 2),
    ("COP", 170, 2),
    ("COU", 970, 2),
    ("CRC", 188, 2),
    ("CUP", 192, 2),
    ("CVE", 132, 2),
    ("CZK", 203, 2),
    ("DJF", 262, 0),
    ("DKK", 208, 2),
    ("DOP", 214, 2),
    ("DZD", 12, 2),
    ("EGP", 818, 2),
    ("ERN", 232, 2),
    ("ETB", 230, 2),
    ("EUR", 978, 2),
    ("FJD", 242, 2),
    ("FKP", 238, 2),
    ("GBP", 826, 2),
    ("GEL", 981, 2),
    ("GHS", 936, 2),
    ("GIP", 292, 2),
    ("GMD", 270, 2),
    ("GNF", 324, 0),
    ("GTQ", 320, 2),
    ("GYD", 328, 2),
    ("HKD", 344, 2),
    ("HNL", 340, 2),
    ("HTG", 332, 2),
    ("HUF", 348, 2),
    ("IDR", 360, 2),
    ("ILS", 376, 2),
    ("INR", 356, 2),
    ("IQD", 368, 3),
    ("IRR", 364, 2),
    ("ISK", 352, 0),
    ("JMD", 388, 2),
    ("JOD", 400, 3),
    ("JPY", 392, 0),
    ("KES", 404, 2),
    ("KGS", 417, 2),
    ("KHR", 116, 2),
    ("KMF", 174, 0),
    ("KPW", 408, 2),
    ("KRW", 410, 0),
    ("KWD", 414, 3),
    ("KYD", 136, 2),
    ("KZT", 398, 2),
    ("LAK", 418, 2),
    ("LBP", 422, 2),
    ("LKR", 144, 2),
    ("LRD", 430, 2),
    ("LSL", 426, 2),
    ("LYD", 434, 3),
    ("MAD", 504, 2),
    ("MDL", 498, 2),
    ("MGA", 969, 2),
    ("MKD", 807, 2),
    ("MMK", 104, 2),
    ("MNT", 496, 2),
    ("MOP", 446, 2),
    ("MRU", 929, 2),
    ("MUR", 480, 2),
    ("MVR", 462, 2),
    ("MWK", 454, 2),
    ("MXN", 484, 2),
    ("MXV", 979, 2),
    ("MYR", 458, 2),
    ("MZN", 943, 2),
    ("NAD", 516, 2),
    ("NGN", 566, 2),
    ("NIO", 558, 2),
    ("NOK", 578, 2),
    ("NPR", 524, 2),
    ("NZD", 554, 2),
    ("OMR", 512, 3),
    ("PAB", 590, 2),
    ("PEN", 604, 2),
    ("PGK", 598, 2),
    ("PHP", 608, 2),
    ("PKR", 586, 2),
    ("PLN", 985, 2),
    ("PYG", 600, 0),
    ("QAR", 634, 2),
    ("RON", 946, 2),
    ("RSD", 941, 2),
    ("RUB", 643, 2),
    ("RWF", 646, 0),
    ("SAR", 682, 2),
    ("SBD", 90, 2),
    ("SCR", 690, 2),
    ("SDG", 938, 2),
    ("SEK", 752, 2),
    ("SGD", 702, 2),
    ("SHP", 654, 2),
    ("SLE", 925, 2),
    ("SOS", 706, 2),
    ("SRD", 968, 2),
    ("SSP", 728, 2),
    ("STN", 930, 2),
    ("SVC", 222, 2),
    ("SYP", 760, 2),
    ("SZL", 748, 2),
    ("THB", 764, 2),
    ("TJS", 972, 2),
    ("TMT", 934, 2),
    ("TND", 788, 3),
    ("TOP", 776, 2),
    ("TRY", 949, 2),
    ("TTD", 780, 2),
    ("TWD", 901, 2),
    ("TZS", 834, 2),
    ("UAH", 980, 2),
    ("UGX", 800, 0),
    ("USD", 840, 2),
    ("USN", 997, 2),
    ("UYI", 940, 0),
    ("UYU", 858, 2),
    ("UYW", 927, 4),
    ("UZS", 860, 2),
    ("VED", 926, 2),
    ("VES", 928, 2),
    ("VND", 704, 0),
    ("VUV", 548, 0),
    ("WST", 882, 2),
    ("XAF", 950, 0),
    ("XCD", 951, 2),
    ("XCG", 532, 2),
    ("XOF", 952, 0),
    ("XPF", 953, 0),
    ("YER", 886, 2),
    ("ZAR", 710, 2),
    ("ZMW", 967, 2),
    ("ZWG", 924, 2),
];

/// An ISO 4217 currency. Only codes in [`CURRENCIES`] can be constructed, so
/// every `Currency` has a known exponent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency(u8);

/// A currency code that is not in the ISO 4217 active list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown currency {code:?}: expected an ISO 4217 active code such as \"EUR\" or \"JPY\"")]
pub struct UnknownCurrency {
    pub code: String,
}

impl Currency {
    /// Look a code up; codes are upper case, exactly three letters.
    pub fn from_code(code: &str) -> Result<Self, UnknownCurrency> {
        CURRENCIES
            .binary_search_by(|c| c.code.cmp(code))
            .map(|index| Currency(index as u8))
            .map_err(|_| UnknownCurrency { code: code.to_owned() })
    }

    pub fn info(self) -> &'static CurrencyInfo {
        &CURRENCIES[self.0 as usize]
    }

    pub fn code(self) -> &'static str {
        self.info().code
    }

    pub fn exponent(self) -> u8 {
        self.info().exponent
    }

    pub fn numeric(self) -> u16 {
        self.info().numeric
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl std::str::FromStr for Currency {
    type Err = UnknownCurrency;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::from_code(s)
    }
}

// Persisted and transported as the code, never the table index: the index
// changes when the table does, the code does not.
impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Currency::from_code(&code).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_and_fits_an_index() {
        assert!(CURRENCIES.len() < 256);
        for pair in CURRENCIES.windows(2) {
            assert!(pair[0].code < pair[1].code, "{} before {}", pair[0].code, pair[1].code);
        }
        for c in CURRENCIES {
            assert_eq!(c.code.len(), 3);
            assert!(c.code.bytes().all(|b| b.is_ascii_uppercase()));
            assert!(c.exponent <= 4);
        }
    }

    #[test]
    fn exponents_are_the_real_ones() {
        for (code, exp) in [("JPY", 0), ("EUR", 2), ("BHD", 3), ("KWD", 3), ("CLF", 4), ("KRW", 0), ("USD", 2)] {
            assert_eq!(Currency::from_code(code).unwrap().exponent(), exp, "{code}");
        }
    }

    #[test]
    fn unknown_and_lower_case_codes_are_rejected() {
        for code in ["eur", "XXX", "", "EURO", "E", "ZWL"] {
            let err = Currency::from_code(code).unwrap_err();
            assert!(err.to_string().contains("unknown currency"));
        }
    }

    #[test]
    fn serializes_as_code() {
        let eur = Currency::from_code("EUR").unwrap();
        assert_eq!(serde_json::to_string(&eur).unwrap(), "\"EUR\"");
        assert_eq!(serde_json::from_str::<Currency>("\"EUR\"").unwrap(), eur);
        assert!(serde_json::from_str::<Currency>("\"NOPE\"").is_err());
    }
}
