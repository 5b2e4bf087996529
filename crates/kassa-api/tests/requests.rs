//! Every bad input a caller can send gets a 4xx naming the field, and a good
//! one becomes domain values.

use kassa_api::*;
use kassa_domain::Timestamp;
use proptest::prelude::*;
use serde_json::json;
use std::collections::HashMap;

const NOW: Timestamp = Timestamp(1_795_651_200_000); // 2026-11-26

fn good() -> serde_json::Value {
    json!({
        "amount": 1999,
        "currency": "EUR",
        "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"},
        "capture": true,
        "reference": "order-1001",
        "metadata": {"order": "1001"}
    })
}

fn with(path: &[&str], value: serde_json::Value) -> Vec<u8> {
    let mut body = good();
    let mut target = &mut body;
    for key in &path[..path.len() - 1] {
        target = target.get_mut(*key).unwrap();
    }
    let last = path[path.len() - 1];
    if value.is_null() && last != "capture" {
        target.as_object_mut().unwrap().remove(last);
    } else {
        target[last] = value;
    }
    serde_json::to_vec(&body).unwrap()
}

fn rejected(body: &[u8]) -> ApiError {
    parse_create_payment(body, NOW).expect_err("should be rejected")
}

#[test]
fn a_good_body_becomes_domain_values() {
    let request = parse_create_payment(&serde_json::to_vec(&good()).unwrap(), NOW).unwrap();
    assert_eq!(request.amount.to_string(), "19.99 EUR");
    assert_eq!(request.card.pan.last4(), "4242");
    assert!(request.capture);
    assert_eq!(request.reference.as_deref(), Some("order-1001"));
    let minimal = json!({"amount": 500, "currency": "jpy",
        "card": {"number": "5555 5555 5555 4444", "exp_month": 1, "exp_year": 2031, "cvc": "9999"}});
    let request = parse_create_payment(&serde_json::to_vec(&minimal).unwrap(), NOW).unwrap();
    assert_eq!(request.amount.to_string(), "500 JPY");
    assert!(request.capture, "capture defaults to true");
}

#[test]
fn each_bad_field_is_named() {
    let cases: Vec<(Vec<u8>, &str, Option<&str>)> = vec![
        (b"{not json".to_vec(), "invalid_json", None),
        (b"[1,2]".to_vec(), "invalid_json", None),
        (b"".to_vec(), "invalid_json", None),
        (with(&["amount"], json!(19.99)), "parameter_invalid_integer", Some("amount")),
        (with(&["amount"], json!(1e3)), "parameter_invalid_integer", Some("amount")),
        (with(&["amount"], json!("1999")), "parameter_invalid_integer", Some("amount")),
        (with(&["amount"], json!(0)), "amount_too_small", Some("amount")),
        (with(&["amount"], json!(-5)), "amount_too_small", Some("amount")),
        (with(&["amount"], json!(100_000_000_000i64)), "amount_too_large", Some("amount")),
        (with(&["amount"], json!(18_446_744_073_709_551_615u64)), "amount_too_large", Some("amount")),
        (with(&["amount"], json!(null)), "parameter_missing", Some("amount")),
        (with(&["currency"], json!("XYZ")), "invalid_currency", Some("currency")),
        (with(&["currency"], json!(978)), "parameter_invalid_string", Some("currency")),
        (with(&["currency"], json!(null)), "parameter_missing", Some("currency")),
        (with(&["card"], json!("4242424242424242")), "parameter_invalid_object", Some("card")),
        (with(&["card", "number"], json!("4242424242424241")), "incorrect_number", Some("card[number]")),
        (with(&["card", "number"], json!("4242")), "invalid_number", Some("card[number]")),
        (with(&["card", "number"], json!(4242424242424242u64)), "parameter_invalid_string", Some("card[number]")),
        (with(&["card", "number"], json!(null)), "parameter_missing", Some("card[number]")),
        (with(&["card", "exp_month"], json!(13)), "invalid_expiry_month", Some("card[exp_month]")),
        (with(&["card", "exp_month"], json!(-1)), "invalid_expiry_month", Some("card[exp_month]")),
        (with(&["card", "exp_year"], json!(2020)), "expired_card", Some("card[exp_year]")),
        (with(&["card", "exp_year"], json!(99999)), "invalid_expiry_year", Some("card[exp_year]")),
        (with(&["card", "cvc"], json!("12")), "invalid_cvc", Some("card[cvc]")),
        (with(&["card", "pin"], json!("1234")), "parameter_unknown", Some("card[pin]")),
        (with(&["capture"], json!("yes")), "parameter_invalid_boolean", Some("capture")),
        (with(&["reference"], json!("x".repeat(256))), "parameter_too_long", Some("reference")),
        (with(&["metadata"], json!(["a"])), "parameter_invalid_object", Some("metadata")),
        (with(&["metadata"], json!({"k": 1})), "parameter_invalid_string", Some("metadata[k]")),
        (with(&["metadata"], json!({"": "v"})), "metadata_key_invalid", Some("metadata[]")),
        (with(&["amount_cents"], json!(1)), "parameter_unknown", Some("amount_cents")),
    ];
    for (body, code, param) in cases {
        let error = rejected(&body);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(error.status, 400, "{text}");
        assert_eq!(error.code, code, "{text}: {error}");
        assert_eq!(error.param.as_deref(), param, "{text}: {error}");
        assert!(!error.message.is_empty());
    }
}

#[test]
fn errors_never_echo_the_card_number() {
    let error = rejected(&with(&["card", "number"], json!("4242424242424241")));
    let body = error.body().to_string();
    assert!(!body.contains("4242424242424241"), "{body}");
    assert_eq!(error.body()["error"]["type"], "invalid_request_error");
}

#[test]
fn capture_and_refund_bodies() {
    assert_eq!(parse_amount_request(b"").unwrap().amount_minor, None);
    assert_eq!(parse_amount_request(b"{}").unwrap().amount_minor, None);
    assert_eq!(parse_amount_request(br#"{"amount": 500}"#).unwrap().amount_minor, Some(500));
    assert_eq!(parse_amount_request(br#"{"amount": 5.5}"#).unwrap_err().param.as_deref(), Some("amount"));
    assert_eq!(parse_amount_request(br#"{"amount": 0}"#).unwrap_err().code, "amount_too_small");
    assert_eq!(parse_amount_request(br#"{"amont": 5}"#).unwrap_err().code, "parameter_unknown");
}

#[test]
fn list_queries() {
    let query =
        |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
    assert_eq!(parse_list_query(&query(&[])).unwrap().limit, 10);
    assert_eq!(parse_list_query(&query(&[("limit", "100")])).unwrap().limit, 100);
    for bad in ["0", "101", "-1", "ten", ""] {
        assert_eq!(parse_list_query(&query(&[("limit", bad)])).unwrap_err().param.as_deref(), Some("limit"));
    }
    assert_eq!(
        parse_list_query(&query(&[("starting_after", "pay_x")])).unwrap_err().param.as_deref(),
        Some("starting_after")
    );
    assert_eq!(parse_list_query(&query(&[("offset", "1")])).unwrap_err().code, "parameter_unknown");
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number)),
        "[a-z0-9 ]{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("amount".to_string()),
                    Just("currency".to_string()),
                    Just("card".to_string()),
                    Just("number".to_string()),
                    Just("exp_month".to_string()),
                    Just("metadata".to_string()),
                    "[a-z]{1,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_create_payment(&bytes, NOW);
        let _ = parse_amount_request(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics_and_errors_are_4xx(value in json_value()) {
        let body = serde_json::to_vec(&value).unwrap();
        if let Err(error) = parse_create_payment(&body, NOW) {
            prop_assert!((400..500).contains(&error.status));
        }
    }
}
