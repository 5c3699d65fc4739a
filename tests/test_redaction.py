import pytest

from policies.redaction import Redactor

TEXT = ("Hi, I'm jane.doe+shop@example.co.uk, call me on +44 20 7946 0958 or (555) 123-4567. "
        "Card 4111-1111-1111-1111 was charged; account number: 12345678, IBAN GB82 WEST 1234 5698 7654 32. "
        "I live at 221B Baker Street. Order A-10293 from 2026-11-02, 12 days ago, $49.99, 1,000 seats.")


@pytest.mark.parametrize("secret", ["jane.doe+shop@example.co.uk", "+44 20 7946 0958", "(555) 123-4567", "4111-1111-1111-1111",
                                    "12345678", "GB82 WEST 1234 5698 7654 32", "221B Baker Street"])
def test_personal_data_is_replaced(secret):
    assert secret not in Redactor().redact(TEXT)


@pytest.mark.parametrize("kept", ["A-10293", "2026-11-02", "12 days", "$49.99", "1,000 seats"])
def test_business_details_are_kept(kept):
    assert kept in Redactor().redact(TEXT)


def test_placeholders_are_stable_and_restorable():
    r = Redactor()
    once = r.redact("mail a@b.io, again a@b.io, then c@d.io")
    assert once == "mail <EMAIL_1>, again <EMAIL_1>, then <EMAIL_2>"
    assert r.restore(once) == "mail a@b.io, again a@b.io, then c@d.io"


def test_configured_patterns():
    assert Redactor(extra_patterns=[r"CUST-\d+"]).redact("customer CUST-9981 called") == "customer <CUSTOM_1> called"
