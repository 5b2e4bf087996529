//! Request bodies and queries, validated into domain values. Every error
//! names the field (`param`) and says what was expected.

use crate::ApiError;
use kassa_domain::{CardDetails, CardError, Currency, Money, PaymentId, Timestamp};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

/// Largest amount accepted, in minor units: 999,999,999.99 in a two-decimal currency.
pub const AMOUNT_MINOR_MAX: i64 = 99_999_999_999;
pub const REFERENCE_CHARS_MAX: usize = 255;
pub const METADATA_KEYS_MAX: usize = 50;
pub const METADATA_KEY_CHARS_MAX: usize = 40;
pub const METADATA_VALUE_CHARS_MAX: usize = 500;
pub const LIST_LIMIT_MAX: u32 = 100;
pub const LIST_LIMIT_DEFAULT: u32 = 10;

/// A validated `POST /v1/payments` body.
#[derive(Debug, Clone)]
pub struct CreatePayment {
    pub amount: Money,
    pub card: CardDetails,
    pub capture: bool,
    pub reference: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// A validated capture or refund body: `{}` or `{"amount": n}` (or no body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmountRequest {
    pub amount_minor: Option<i64>,
}

/// A validated `GET /v1/payments` query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: u32,
    pub starting_after: Option<PaymentId>,
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            crate::ErrorType::InvalidRequestError,
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::new(
            400,
            crate::ErrorType::InvalidRequestError,
            "invalid_json",
            "request body must be a JSON object",
        )),
    }
}

fn refuse_unknown(map: &Map<String, Value>, allowed: &[&str], prefix: &str) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => {
            let param = if prefix.is_empty() { key.clone() } else { format!("{prefix}[{key}]") };
            Err(ApiError::invalid(
                "parameter_unknown",
                &param,
                format!("unknown parameter {param}; allowed: {}", allowed.join(", ")),
            ))
        }
        None => Ok(()),
    }
}

fn integer(value: &Value, param: &str, what: &str) -> Result<i64, ApiError> {
    match value {
        Value::Number(n) => n.as_i64().ok_or_else(|| {
            if n.is_f64() {
                ApiError::invalid(
                    "parameter_invalid_integer",
                    param,
                    format!("{param} must be an integer {what}, not {n}"),
                )
            } else {
                ApiError::invalid("amount_too_large", param, format!("{param} is too large"))
            }
        }),
        other => Err(ApiError::invalid(
            "parameter_invalid_integer",
            param,
            format!("{param} must be an integer {what}, got {}", kind(other)),
        )),
    }
}

fn string<'a>(value: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    value.as_str().ok_or_else(|| {
        ApiError::invalid("parameter_invalid_string", param, format!("{param} must be a string, got {}", kind(value)))
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn required<'a>(map: &'a Map<String, Value>, field: &str, param: &str) -> Result<&'a Value, ApiError> {
    map.get(field)
        .filter(|v| !v.is_null())
        .ok_or_else(|| ApiError::invalid("parameter_missing", param, format!("missing required parameter {param}")))
}

/// A positive amount in minor units, within [`AMOUNT_MINOR_MAX`].
fn amount_minor(value: &Value, param: &str) -> Result<i64, ApiError> {
    let minor = integer(value, param, "number of minor units (1999 for 19.99 EUR)")?;
    if minor <= 0 {
        return Err(ApiError::invalid("amount_too_small", param, format!("{param} must be at least 1, got {minor}")));
    }
    if minor > AMOUNT_MINOR_MAX {
        return Err(ApiError::invalid(
            "amount_too_large",
            param,
            format!("{param} must be at most {AMOUNT_MINOR_MAX}, got {minor}"),
        ));
    }
    Ok(minor)
}

fn card_error(error: CardError) -> ApiError {
    let (code, param) = match error {
        CardError::NotDigits | CardError::WrongLength { .. } => ("invalid_number", "card[number]"),
        CardError::LuhnFailed => ("incorrect_number", "card[number]"),
        CardError::BadExpiryMonth { .. } => ("invalid_expiry_month", "card[exp_month]"),
        CardError::BadExpiryYear { .. } => ("invalid_expiry_year", "card[exp_year]"),
        CardError::Expired { .. } => ("expired_card", "card[exp_year]"),
        CardError::BadCvc => ("invalid_cvc", "card[cvc]"),
    };
    ApiError::invalid(code, param, error.to_string())
}

/// Validate a `POST /v1/payments` body at `now` (for the card's expiry).
pub fn parse_create_payment(body: &[u8], now: Timestamp) -> Result<CreatePayment, ApiError> {
    let map = object(body)?;
    refuse_unknown(&map, &["amount", "currency", "card", "capture", "reference", "metadata"], "")?;
    let minor = amount_minor(required(&map, "amount", "amount")?, "amount")?;
    let code = string(required(&map, "currency", "currency")?, "currency")?;
    let currency = Currency::from_code(&code.to_ascii_uppercase())
        .map_err(|e| ApiError::invalid("invalid_currency", "currency", e.to_string()))?;

    let card = match required(&map, "card", "card")? {
        Value::Object(card) => card,
        other => {
            return Err(ApiError::invalid(
                "parameter_invalid_object",
                "card",
                format!("card must be an object, got {}", kind(other)),
            ));
        }
    };
    refuse_unknown(card, &["number", "exp_month", "exp_year", "cvc"], "card")?;
    let number = string(required(card, "number", "card[number]")?, "card[number]")?;
    let exp_month = integer(required(card, "exp_month", "card[exp_month]")?, "card[exp_month]", "month (1-12)")?;
    let exp_year = integer(required(card, "exp_year", "card[exp_year]")?, "card[exp_year]", "four-digit year")?;
    let cvc = string(required(card, "cvc", "card[cvc]")?, "card[cvc]")?;
    let exp_month = u8::try_from(exp_month).map_err(|_| {
        ApiError::invalid("invalid_expiry_month", "card[exp_month]", format!("expiry month {exp_month} is not 1-12"))
    })?;
    let exp_year = u16::try_from(exp_year).map_err(|_| {
        ApiError::invalid(
            "invalid_expiry_year",
            "card[exp_year]",
            format!("expiry year {exp_year} is not a four-digit year"),
        )
    })?;
    let card = CardDetails::parse(number, exp_month, exp_year, cvc, now).map_err(card_error)?;

    let capture = match map.get("capture") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::invalid(
                "parameter_invalid_boolean",
                "capture",
                format!("capture must be true or false, got {}", kind(other)),
            ));
        }
    };
    let reference = match map.get("reference") {
        None | Some(Value::Null) => None,
        Some(value) => {
            let text = string(value, "reference")?;
            if text.chars().count() > REFERENCE_CHARS_MAX {
                return Err(ApiError::invalid(
                    "parameter_too_long",
                    "reference",
                    format!("reference must be at most {REFERENCE_CHARS_MAX} characters"),
                ));
            }
            Some(text.to_owned())
        }
    };
    let metadata = match map.get("metadata") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(entries)) => {
            if entries.len() > METADATA_KEYS_MAX {
                return Err(ApiError::invalid(
                    "metadata_too_large",
                    "metadata",
                    format!("metadata may have at most {METADATA_KEYS_MAX} keys"),
                ));
            }
            let mut metadata = BTreeMap::new();
            for (key, value) in entries {
                let param = format!("metadata[{key}]");
                if key.is_empty() || key.chars().count() > METADATA_KEY_CHARS_MAX {
                    return Err(ApiError::invalid(
                        "metadata_key_invalid",
                        &param,
                        format!("metadata keys must be 1 to {METADATA_KEY_CHARS_MAX} characters"),
                    ));
                }
                let text = string(value, &param)?;
                if text.chars().count() > METADATA_VALUE_CHARS_MAX {
                    return Err(ApiError::invalid(
                        "parameter_too_long",
                        &param,
                        format!("{param} must be at most {METADATA_VALUE_CHARS_MAX} characters"),
                    ));
                }
                metadata.insert(key.clone(), text.to_owned());
            }
            metadata
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "parameter_invalid_object",
                "metadata",
                format!("metadata must be an object of strings, got {}", kind(other)),
            ));
        }
    };
    Ok(CreatePayment { amount: Money::new(minor, currency), card, capture, reference, metadata })
}

/// Validate a capture or refund body. An empty body means "the whole amount".
pub fn parse_amount_request(body: &[u8]) -> Result<AmountRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(AmountRequest { amount_minor: None });
    }
    let map = object(body)?;
    refuse_unknown(&map, &["amount"], "")?;
    let amount_minor = match map.get("amount") {
        None | Some(Value::Null) => None,
        Some(value) => Some(amount_minor(value, "amount")?),
    };
    Ok(AmountRequest { amount_minor })
}

/// Validate `?limit=&starting_after=`.
pub fn parse_list_query(query: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
    if let Some(key) = query.keys().find(|k| !["limit", "starting_after"].contains(&k.as_str())) {
        return Err(ApiError::invalid(
            "parameter_unknown",
            key,
            format!("unknown query parameter {key}; allowed: limit, starting_after"),
        ));
    }
    let limit = match query.get("limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(text) => match text.parse::<u32>() {
            Ok(limit) if (1..=LIST_LIMIT_MAX).contains(&limit) => limit,
            _ => {
                return Err(ApiError::invalid(
                    "parameter_invalid_integer",
                    "limit",
                    format!("limit must be an integer from 1 to {LIST_LIMIT_MAX}, got {text:?}"),
                ));
            }
        },
    };
    let starting_after = match query.get("starting_after") {
        None => None,
        Some(text) => Some(
            PaymentId::parse(text)
                .map_err(|e| ApiError::invalid("parameter_invalid_id", "starting_after", e.to_string()))?,
        ),
    };
    Ok(ListQuery { limit, starting_after })
}
