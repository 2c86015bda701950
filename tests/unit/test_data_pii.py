"""PII scrubbing: exact outputs on true positives of every kind, and no false positives on numeric text and code.

Numbers, hashes, slices and names are the substance of math and code corpora: every false-positive case
here is a string the scrubber once destroyed or plausibly would.
"""

from __future__ import annotations

import random

import pytest

from r1ray.data.clean import PII_KINDS, _luhn_ok, card_brand, is_card_number, scrub_pii
from r1ray.data.config import PIIConfig

CFG = PIIConfig()


def scrub(text: str) -> str:
    return scrub_pii(text, CFG)[0]


def test_pii_replaced_with_typed_placeholders_and_counted():
    text = (
        "Mail jane.doe+news@example.co.uk or call +1 415-555-0132 / (020) 7946 0018. "
        "Server 192.168.10.254 and fe80:0:0:0:202:b3ff:fe1e:8329. Card 4111 1111 1111 1111, "
        "order 1234 5678 9012 3456 (not Luhn), version 3.11.7, year 2026. Key AKIAIOSFODNN7EXAMPLE."
    )
    out, counts = scrub_pii(text, CFG)
    assert out == (
        "Mail <EMAIL> or call <PHONE> / <PHONE>. Server <IP_ADDRESS> and <IP_ADDRESS>. Card <CARD_NUMBER>, "
        "order 1234 5678 9012 3456 (not Luhn), version 3.11.7, year 2026. Key <SECRET>."
    )
    assert counts == {"email": 1, "phone": 2, "ip": 2, "card": 1, "secret": 1}


def test_pii_kinds_and_disable():
    text = "write to a@b.org from 10.0.0.1"
    assert scrub_pii(text, PIIConfig(kinds=("ip",)))[0] == "write to a@b.org from <IP_ADDRESS>"
    assert scrub_pii(text, PIIConfig(enabled=False)) == (text, dict.fromkeys(PII_KINDS, 0))
    assert scrub_pii("AKIAIOSFODNN7EXAMPLE", PIIConfig(kinds=("card",)))[0] == "AKIAIOSFODNN7EXAMPLE"


# ---- cards: true positives, one per brand, grouped and ungrouped-with-context

BRANDS = [  # (number, brand): the issuers' published test numbers
    ("4111111111111111", "visa"), ("4222222222222", "visa"), ("5555555555554444", "mastercard"),
    ("2223003122003222", "mastercard"), ("378282246310005", "amex"), ("6011111111111117", "discover"),
    ("30569309025904", "diners"), ("3530111333300000", "jcb"), ("6200000000000005", "unionpay"),
    ("6759649826438453", "maestro"),
]


def _grouped(n: str, sep: str) -> str:
    if len(n) == 15:
        return sep.join([n[:4], n[4:10], n[10:]])  # Amex 4-6-5
    if len(n) == 14:
        return sep.join([n[:4], n[4:10], n[10:]])  # Diners 4-6-4
    return sep.join(n[i : i + 4] for i in range(0, len(n), 4))


@pytest.mark.parametrize("number, brand", BRANDS)
def test_each_card_brand_is_recognised(number, brand):
    assert card_brand(number) == brand and is_card_number(number)
    for sep in (" ", "-"):
        g = _grouped(number, sep)
        assert scrub(f"Paid with {g}.") == "Paid with <CARD_NUMBER>.", g
    assert scrub(f"card number: {number}") == "card number: <CARD_NUMBER>"
    assert scrub(f"Visa {number} exp 12/29") == "Visa <CARD_NUMBER> exp 12/29"


def test_card_needs_a_brand_prefix_a_brand_length_and_luhn():
    assert _luhn_ok("1234567812345670") and not is_card_number("1234567812345670")  # no issuer starts with 1
    assert _luhn_ok("41111111111111111") is False or not is_card_number("41111111111111111")
    assert not is_card_number("378282246310006")  # Amex prefix, Luhn fails
    assert not is_card_number("37828224631000")  # Amex prefix, 14 digits
    assert scrub("card 1234 5678 1234 5670") == "card 1234 5678 1234 5670"


# ---- cards and IPs: false positives on numeric text and code

NUMERIC_TEXT = [
    "row 5 0.8444218515250481",  # the case: a random decimal whose digits pass Luhn
    "x = 0.4111111111111111",
    "p = 4111111111111111.0",
    "1,4111111111111111",
    "h = 0x4111111111111111",
    "digest d41d8cd98f00b204e9800998ecf84270 and 4111111111111111abcdef0",
    "ts 1700000000123 and 1700000000123456789 ns",
    "2026-01-15T12:34:56.4111111111111111Z",
    "n = 4111111111111111  # a long integer constant",
    "N = 5555555555554444 * 2",
    "uuid 41111111-1111-1111-1111-111111111111",
    "groups 4111 1111 1111 1111 1111",  # five groups: a table of numbers, not a card
    "1 4111 1111 1111 1111",  # a leading number makes it a row of numbers
    "phone-like +1-4111-1111-1111-1111",
    "path /orders/4111111111111111/items",
    "$4111111111111111 and #4111111111111111",
    "version 3.11.7 and ratio 1:2:3 and 12:30:45 and mac 00:1a:2b:3c:4d:5e",
    "x[1::2], y[:, ::2], z[:, 1::2], s[::-1], a[b::2]",
    "std::vector<int> v; dead::beef; Foo::Bar; fn::<u8>()",
    "f :: Int -> Int",
    "version 3.1.1.6, release 2.7.2.2 and sections \"8.2.4.44 Bogus comment\"",
    "see https://tools.ietf.org/html/rfc7231#section-7.1.1.1 and RFC 1918 \u00a7 3.2.1.4",
]


@pytest.mark.parametrize("text", NUMERIC_TEXT)
def test_numeric_text_and_code_are_left_alone(text):
    assert scrub(text) == text


def test_random_decimals_are_never_cards():
    rng = random.Random(0)
    rows = [f"row {i} {rng.random()!r}" for i in range(2000)]
    rows += [f"{rng.randrange(10**15, 10**19)}" for _ in range(2000)]  # long integers without context
    # Several of these pass Luhn with a brand prefix: only context or grouping may make them cards.
    assert sum(is_card_number(r.split()[-1].split(".")[-1]) for r in rows) > 20
    text = "\n".join(rows)
    assert scrub(text) == text


# ---- IPv6, all forms

@pytest.mark.parametrize("addr", [
    "2001:db8::1", "::1", "fe80::1%eth0", "fe80::202:b3ff:fe1e:8329", "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
    "::ffff:192.0.2.1", "2001:db8::", "fd00:ec2::254",
])
def test_ipv6_all_forms_scrubbed(addr):
    assert scrub(f"host {addr} is up.") == "host <IP_ADDRESS> is up."
    assert scrub(f"http://[{addr}]:8080/x") == "http://[<IP_ADDRESS>]:8080/x"


# ---- secrets

SECRETS = [
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_" + "a1B2c3D4e5" * 3 + "f6G7h8",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGH",
    "sk-proj-abcDEF123456ghiJKL789mnoPQR",
    "sk-ant-api03-abcDEF123456ghiJKL789mnoPQRstu",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "xoxb-1234567890-abcdefghijkl",
    "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
]


@pytest.mark.parametrize("secret", SECRETS)
def test_provider_keys_and_tokens_scrubbed(secret):
    out, counts = scrub_pii(f"export TOKEN_X {secret} # keep", CFG)
    assert out == "export TOKEN_X <SECRET> # keep" and counts["secret"] == 1


def test_private_key_block_scrubbed_whole_and_when_cut():
    body = "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\nZ1BjP5CE/Wm/Rr500P\n"
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{body}-----END RSA PRIVATE KEY-----"
    assert scrub(f"key:\n{block}\nafter") == "key:\n<SECRET>\nafter"
    assert scrub(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{body}") == "<SECRET>"
    # Code that names the marker is not a key.
    code = '_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"\n_SK_END = b"-----END OPENSSH PRIVATE KEY-----"'
    assert scrub(code) == code


@pytest.mark.parametrize("line, want", [
    ('api_key = "Zx81kQp0Lm27VbN4sTq9WcR3"', 'api_key = "<SECRET>"'),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY2EXAMPLEKEY",
     "AWS_SECRET_ACCESS_KEY=<SECRET>"),
    ('{"client_secret": "9f8e7d6c5b4a39281706f5e4d3c2b1a0"}', '{"client_secret": "<SECRET>"}'),
    ("password: Tr0ub4dor&3x9Kq2Lm7Pz", "password: Tr0ub4dor&3x9Kq2Lm7Pz"),  # '&' is not a key character
])
def test_secret_assignments_scrub_only_the_value(line, want):
    assert scrub(line) == want


@pytest.mark.parametrize("line", [
    "api_key = 'YOUR_API_KEY_HERE'",  # a placeholder: low entropy, no digit
    "password = get_password_from_environment()",
    "tag_list, next_token = self.cloudhsmv2_backend.list_tags(",
    "private_key: PKCS7PrivateKeyTypes,",
    "self, private_key: ed25519.Ed25519PrivateKey, f_priv: _FragList",
    "private_key = Ed25519PrivateKey.generate()",
    "Credential=mock_access_key/20220524/us-east-1/cognito-idp/aws4_request",
    'token_pattern = "[A-Za-z0-9]+"',
    "self.token = token",
    '"AWS::IAM::AccessKey": "62d91b17309e76c8",',  # a 16-digit schema hash, shorter than any generated key
    "MLKEM768X25519PrivateKey = rust_openssl.hpke.MLKEM768X25519PrivateKey",
])
def test_code_naming_keys_is_left_alone(line):
    assert scrub(line) == line


def test_fast_scanners_find_exactly_the_reference_patterns_matches():
    """E-mail, phone and IPv4 are scanned with patterns Python's ``re`` can skip ahead on, with the reference
    patterns' look-behinds checked per candidate: on random strings dense in the characters that matter, the
    output equals the reference pattern's ``subn`` (every match, in place, and the count)."""
    from r1ray.data import clean as C

    def reference_ipv4(text):
        n = 0

        def one(m):
            nonlocal n
            if C._IPV4_NOT_AFTER_RE.search(text, max(0, m.start() - 24), m.start()):
                return m.group(0)
            n += 1
            return C.PLACEHOLDERS["ip"]
        return C._IPV4_RE.sub(one, text), n

    r = random.Random(0)

    def strings(alphabet, n, longest):
        return ["".join(r.choice(alphabet) for _ in range(r.randrange(1, longest))) for _ in range(n)]

    numeric = strings("0123456789" * 6 + ".:-+() @_abxZ\u00e9\u0663\n%" + "." * 5 + " " * 6, 20_000, 60)
    address = strings("abAZ" * 4 + "..@@-_%+ \u00e91\n", 20_000, 40)
    checks = [
        (lambda t: C._EMAIL_RE.subn(C.PLACEHOLDERS["email"], t), C._scrub_emails, address + numeric),
        (lambda t: C._PHONE_RE.subn(C.PLACEHOLDERS["phone"], t), C._scrub_phones, numeric),
        (reference_ipv4, C._scrub_ipv4, numeric),
    ]
    for reference, fast, texts in checks:
        assert [reference(t) for t in texts] == [fast(t) for t in texts]
        assert sum(fast(t)[1] for t in texts) > 10  # the strings do hold matches
