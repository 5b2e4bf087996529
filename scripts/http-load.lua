-- One new payment per request: an approved card, authorized and captured.
-- wrk reports "Non-2xx or 3xx responses" if any request failed.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KASSA_KEY")
wrk.body = '{"amount": 1999, "currency": "EUR", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}'
