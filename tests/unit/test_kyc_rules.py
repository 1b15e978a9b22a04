"""The built-in KYC provider's rules: age, document numbers, addresses, sanctions screening."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from billfold.config import Settings
from billfold.users.kyc import (
    BuiltinKycProvider,
    Check,
    KycApplicant,
    KycDecision,
    SanctionsEntry,
    SanctionsList,
    _escalate,
    age_on,
    check_address,
    check_age,
    check_document,
    combine,
    default_provider,
    default_sanctions_path,
    load_sanctions_list,
    name_skeleton,
    normalize_name,
    tier_for,
)

TODAY = date(2025, 6, 15)


def years_ago(years: int, today: date = TODAY) -> date:
    return today.replace(year=today.year - years)


# --- age ------------------------------------------------------------------------------------------


def test_eighteenth_birthday_today_passes():
    assert check_age(years_ago(18), TODAY).result == "pass"


def test_eighteenth_birthday_tomorrow_fails():
    dob = date(2007, 6, 16)
    assert age_on(dob, TODAY) == 17
    check = check_age(dob, TODAY)
    assert check.result == "fail"
    assert "18" in (check.reason or "")


def test_eighteenth_birthday_yesterday_passes():
    assert check_age(date(2007, 6, 14), TODAY).result == "pass"


def test_leap_day_birthday_comes_of_age_on_first_of_march():
    dob = date(2004, 2, 29)
    assert check_age(dob, date(2022, 2, 28)).result == "fail"
    assert check_age(dob, date(2022, 3, 1)).result == "pass"
    assert check_age(dob, date(2024, 2, 29)).result == "pass"


def test_future_and_implausible_birth_dates_fail():
    assert check_age(date(2030, 1, 1), TODAY).result == "fail"
    assert check_age(date(1890, 1, 1), TODAY).result == "fail"
    assert check_age(date(1905, 7, 1), TODAY).result == "pass"  # 119


# --- document numbers -----------------------------------------------------------------------------

DOB = date(1985, 7, 4)


@pytest.mark.parametrize(
    ("doc_type", "country", "number"),
    [
        ("passport", "US", "123456789"),
        ("passport", "US", "A12345678"),
        ("passport", "DE", "C01X00T47"),
        ("passport", "GB", "925076473"),
        ("passport", "FR", "18AV12345"),
        ("passport", "ES", "PAA123456"),
        ("passport", "IT", "YA1234567"),
        ("passport", "NZ", "LA123456"),
        ("national_id", "DE", "L01X00T47"),
        ("national_id", "FR", "880692310285"),
        ("national_id", "FR", "X4RTBPFW4"),
        ("national_id", "ES", "12345678Z"),
        ("national_id", "ES", "X1234567L"),
        ("national_id", "IT", "CA12345AA"),
        ("national_id", "SE", "19850704123"),
        ("driving_licence", "US", "D1234567"),
        ("driving_licence", "DE", "B072RRE2I55"),
        ("driving_licence", "FR", "123456789012"),
        ("driving_licence", "GB", "MORGA807045SM9IJ"),
        ("driving_licence", "GB", "MORGA857045SM9IJ"),  # month + 50
        ("driving_licence", "CA", "A12345678901234"),
    ],
)
def test_valid_document_numbers_pass(doc_type, country, number):
    check = check_document(doc_type, country, number, DOB)
    assert check.result == "pass", check.reason


@pytest.mark.parametrize(
    ("doc_type", "country", "number", "why"),
    [
        ("passport", "US", "12345678", "9 digits"),
        ("passport", "US", "AB1234567", "9 digits"),
        ("passport", "DE", "A01X00T47", "starting with C"),
        ("passport", "DE", "C01A00T47", "starting with C"),  # vowels are never used
        ("passport", "GB", "92507647A", "9 digits"),
        ("passport", "FR", "18A123456", "2 digits, 2 letters"),
        ("passport", "NZ", "LA12", "6 to 9"),
        ("national_id", "US", "123456789", "does not issue"),
        ("national_id", "GB", "123456789", "does not issue"),
        ("national_id", "DE", "C01X00T47", "starting with L"),
        ("national_id", "ES", "12345678A", "control letter"),
        ("national_id", "ES", "X1234567A", "control letter"),
        ("driving_licence", "US", "ABCDEFG", "5 to 13"),
        ("driving_licence", "DE", "B072RRE2I5", "11 letters"),
        ("driving_licence", "GB", "MORGA857045SM9I", "16 characters"),
        ("driving_licence", "GB", "MORGA817045SM9IJ", "date of birth"),  # born 1915
        ("driving_licence", "GB", "MORGA807055SM9IJ", "date of birth"),  # 5 July
    ],
)
def test_invalid_document_numbers_fail(doc_type, country, number, why):
    check = check_document(doc_type, country, number, DOB)
    assert check.result == "fail"
    assert check.name == "document_number"
    assert why in (check.reason or "")


# --- address --------------------------------------------------------------------------------------


def address(**overrides):
    base = {
        "line1": "Unter den Linden 77",
        "line2": None,
        "city": "Berlin",
        "region": None,
        "postal_code": "10117",
        "country": "DE",
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "addr",
    [
        address(),
        address(
            line1="1600 Pennsylvania Ave NW",
            city="Washington",
            region="DC",
            postal_code="20500",
            country="US",
        ),
        address(line1="Rose Cottage", city="Ambridge", postal_code="SW1A 2AA", country="GB"),
        address(
            line1="1 Infinite Loop",
            city="Cupertino",
            region="CA",
            postal_code="95014-2083",
            country="US",
        ),
        address(line1="Damrak 1", city="Amsterdam", postal_code="1012 LG", country="NL"),
        address(line1="12 Rue de Rivoli", city="Paris", postal_code="75001", country="FR"),
        address(line1="Calle Mayor 5", city="Tokyo", postal_code="100-0001", country="JP"),
        address(line1="Main Road", city="Nairobi", postal_code="00100", country="KE"),
    ],
)
def test_complete_addresses_pass(addr):
    check = check_address(addr)
    assert check.result == "pass", check.reason


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        (address(line1="Unter den Linden"), "house number"),
        (address(postal_code="1011"), "postal code"),
        (address(postal_code="SW1A 2AA"), "postal code"),
        (address(line1="Postfach 1234"), "PO box"),
        (address(line1="P.O. Box 42", country="GB", postal_code="SW1A 2AA"), "PO box"),
        (address(line1="n/a"), "street"),
        (address(city="xxx"), "city"),
        (address(city="12345"), "city"),
        (address(line1="123", line2=None), "street"),
        (address(country="US", postal_code="20500", line1="1 Main St"), "state"),
        (address(country="US", postal_code="20500", line1="1 Main St", region="XY"), "USPS"),
        (address(country="US", postal_code="2050", line1="1 Main St", region="NY"), "postal"),
        (address(country="GB", postal_code="12345", line1="Rose Cottage"), "postal code"),
    ],
)
def test_incomplete_addresses_fail(addr, why):
    check = check_address(addr)
    assert check.result == "fail"
    assert why in (check.reason or ""), check.reason


# --- names ----------------------------------------------------------------------------------------


def test_normalize_name_strips_diacritics_punctuation_and_honorifics():
    assert normalize_name("Dr. Jürgen O'Brien-Łęcki") == "jurgen obrien lecki"
    assert normalize_name("  JOSÉ   María  ") == "jose maria"
    assert normalize_name("Søren Ærø") == "soren aero"
    assert normalize_name("Straße") == "strasse"


def test_normalize_name_transliterates_cyrillic_and_greek():
    assert normalize_name("Виктор Драженко") == "viktor drazhenko"
    assert normalize_name("Νικόλαος Παπαδημητράκης") == "nikolaos papadimitrakis"


def test_skeleton_collapses_spelling_variants():
    assert name_skeleton(normalize_name("Jon Smyth")) == name_skeleton("john smith")
    assert name_skeleton(normalize_name("Juergen Mueller")) == name_skeleton(
        normalize_name("Jürgen Müller")
    )
    assert name_skeleton("philip") == name_skeleton("filip")


# --- sanctions ------------------------------------------------------------------------------------


def john_smith(dob: str | None = None) -> SanctionsList:
    return SanctionsList(
        [
            SanctionsEntry(
                id="T-1",
                name="John Smith",
                aliases=("Johnny the Fox",),
                date_of_birth=dob,
                country="GB",
                source="Test list",
            )
        ]
    )


def test_exact_name_without_listed_birth_date_is_rejected():
    check = john_smith().screen("John Smith", DOB)
    assert check.result == "fail"
    assert check.detail["matches"][0]["entry_id"] == "T-1"


def test_word_order_and_case_do_not_matter():
    assert john_smith().screen("SMITH, john", DOB).result == "fail"


def test_exact_name_with_matching_birth_date_is_rejected():
    assert john_smith("1985-07-04").screen("John Smith", DOB).result == "fail"


def test_exact_name_with_other_birth_date_goes_to_review():
    check = john_smith("1950-01-01").screen("John Smith", DOB)
    assert check.result == "review"
    assert check.detail["matches"][0]["date_of_birth"] == "mismatch"


def test_year_only_birth_dates_compare_the_year():
    assert john_smith("1985").screen("John Smith", DOB).result == "fail"
    assert john_smith("1986").screen("John Smith", DOB).result == "review"


def test_spelling_variant_jon_smyth_goes_to_review():
    check = john_smith().screen("Jon Smyth", DOB)
    assert check.result == "review"
    assert check.detail["matches"][0]["match"] in ("fuzzy", "phonetic")
    assert "T-1" in (check.reason or "")


def test_spelling_variant_with_matching_birth_date_still_goes_to_review():
    assert john_smith("1985-07-04").screen("Jon Smyth", DOB).result == "review"


def test_spelling_variant_ruled_out_by_birth_date_passes():
    check = john_smith("1950-01-01").screen("Jon Smyth", DOB)
    assert check.result == "pass"
    assert check.detail["cleared_by_birth_date"] == ["T-1"]


def test_partial_name_with_extra_middle_name_goes_to_review():
    assert john_smith().screen("John Alexander Smith", DOB).result == "review"


def test_a_shared_surname_alone_is_not_a_match():
    assert john_smith().screen("Ada Smith", DOB).result == "pass"
    assert john_smith().screen("Smith", DOB).result == "pass"


def test_aliases_are_screened():
    assert john_smith().screen("Johnny the Fox", DOB).result == "fail"


SHIPPED = load_sanctions_list(default_sanctions_path())


def test_shipped_list_is_loaded_once_and_has_entries():
    assert len(SHIPPED) >= 30
    assert load_sanctions_list(default_sanctions_path()) is SHIPPED
    assert all(e.source for e in SHIPPED.entries)


@pytest.mark.parametrize(
    "name",
    [
        "Viktor Drazhenko",
        "Виктор Драженко",  # the Cyrillic alias
        "viktor aleksandrovich DRAZHENKO",
        "Drazhenko Viktor",
    ],
)
def test_shipped_list_exact_hits_with_birth_date_are_rejected(name):
    check = SHIPPED.screen(name, date(1961, 3, 14))
    assert check.result == "fail"
    assert check.detail["matches"][0]["entry_id"] == "SMP-0001"
    assert check.detail["matches"][0]["list"] == "OFAC-SDN sample"


def test_diacritics_and_german_transliteration_match():
    dob = date(1966, 4, 18)
    assert SHIPPED.screen("Jurgen Kesselbruck", dob).result == "fail"
    assert SHIPPED.screen("Juergen Kesselbrueck", dob).result == "fail"
    assert SHIPPED.screen("JÜRGEN KESSELBRÜCK", dob).result == "fail"


def test_greek_script_matches_its_romanisation():
    assert SHIPPED.screen("Νικόλαος Παπαδημητράκης", date(1967, 5, 25)).result == "fail"


def test_transliteration_variant_goes_to_review():
    check = SHIPPED.screen("Victor Drazenko", date(1961, 3, 14))
    assert check.result == "review"


@pytest.mark.parametrize(
    "name",
    [
        "Ada Lovelace",
        "Alice Example",
        "Bob Example",
        "Maria Garcia",
        "John Smith",
        "Grace Hopper",
        "Viktor Petrov",
        "Anna Schmidt",
        "Mohammed Ali",
    ],
)
def test_clean_names_pass(name):
    check = SHIPPED.screen(name, date(1990, 5, 17))
    assert check.result == "pass", check.reason


def test_unscreenable_name_goes_to_review():
    assert SHIPPED.screen("!!!", DOB).result == "review"


def test_sanctions_file_path_is_configurable(tmp_path: Path):
    path = tmp_path / "list.csv"
    path.write_text(
        "id,name,aliases,date_of_birth,country,source,program\n"
        "X-1,Grace Hopper,,,US,Custom list,TEST\n",
        encoding="utf-8",
    )
    provider = default_provider(Settings(sanctions_list_path=path))
    assert provider.sanctions.screen("Grace Hopper", DOB).result == "fail"
    assert default_provider(Settings()).sanctions is SHIPPED


def test_empty_sanctions_file_is_an_error(tmp_path: Path):
    path = tmp_path / "empty.csv"
    path.write_text("id,name,aliases,date_of_birth,country,source,program\n", encoding="utf-8")
    with pytest.raises(ValueError):
        SanctionsList.from_csv(path)


# --- the provider's decision and tiers ------------------------------------------------------------

APPLICANT = KycApplicant(
    legal_name="Ada Lovelace",
    date_of_birth=date(1990, 5, 17),
    address=address(),
    document_type="passport",
    document_country="DE",
    document_number="C01X00T47",
)
PROVIDER = BuiltinKycProvider(SHIPPED)


def test_clean_applicant_is_verified_at_tier_1():
    decision = PROVIDER.evaluate(APPLICANT, TODAY)
    assert decision.decision == "verified"
    assert decision.tier == 1
    assert [c.name for c in decision.checks] == ["age", "document_number", "address", "sanctions"]
    assert all(c.passed for c in decision.checks)
    assert decision.reason is None


def test_verified_with_email_and_phone_is_tier_2():
    applicant = replace(APPLICANT, email_verified=True, phone_verified=True)
    assert PROVIDER.evaluate(applicant, TODAY).tier == 2
    assert PROVIDER.evaluate(replace(APPLICANT, email_verified=True), TODAY).tier == 1


def test_minor_is_rejected_at_tier_0():
    decision = PROVIDER.evaluate(replace(APPLICANT, date_of_birth=date(2010, 1, 1)), TODAY)
    assert decision.decision == "rejected"
    assert decision.tier == 0
    assert "18" in (decision.reason or "")


def test_sanctions_hit_rejects_and_fuzzy_hit_reviews():
    hit = replace(APPLICANT, legal_name="Viktor Drazhenko", date_of_birth=date(1961, 3, 14))
    assert PROVIDER.evaluate(hit, TODAY).decision == "rejected"
    fuzzy = replace(APPLICANT, legal_name="Victor Drazenko", date_of_birth=date(1961, 3, 14))
    decision = PROVIDER.evaluate(fuzzy, TODAY)
    assert decision.decision == "review"
    assert decision.tier == 0


def test_a_failure_outweighs_a_review():
    checks = [Check("a", "review", "look"), Check("b", "fail", "bad"), Check("c", "pass")]
    decision = combine(checks, email_verified=True, phone_verified=True)
    assert decision.decision == "rejected"
    assert decision.reason == "bad"


def test_escalation_never_relaxes_the_provider():
    lenient = KycDecision("verified", 2, (Check("age", "pass"),))
    extra = [Check("age", "pass"), Check("profile_match", "review", "dob differs")]
    out = _escalate(lenient, extra, email_verified=True, phone_verified=True)
    assert (out.decision, out.tier, out.reason) == ("review", 0, "dob differs")
    strict = KycDecision("rejected", 0, (), "provider says no")
    out = _escalate(strict, [Check("age", "pass")], email_verified=True, phone_verified=True)
    assert (out.decision, out.tier, out.reason) == ("rejected", 0, "provider says no")
    stingy = KycDecision("verified", 1, ())
    out = _escalate(stingy, [], email_verified=True, phone_verified=True)
    assert (out.decision, out.tier) == ("verified", 1)


def test_tiers():
    assert tier_for("verified", email_verified=True, phone_verified=True) == 2
    assert tier_for("verified", email_verified=False, phone_verified=True) == 1
    for status in ("unverified", "pending", "review", "rejected"):
        assert tier_for(status, email_verified=True, phone_verified=True) == 0


async def test_assess_is_the_async_face_of_evaluate():
    assert await PROVIDER.assess(APPLICANT, TODAY) == PROVIDER.evaluate(APPLICANT, TODAY)
