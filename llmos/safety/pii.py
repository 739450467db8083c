"""Personal data with checksums: the patterns that find candidates and the checks that
reject look-alikes (a random 16-digit number failing Luhn is not a card).

- emails;
- phone numbers: North American (NANP: area and exchange codes start 2-9; 555-0100..0199, the
  numbers set aside for fiction, are left alone), UK mobiles, +country forms, Chinese mobiles
  (1[3-9] and 9 more digits) and landlines (0 area code, separator, 7-8 digits);
- payment card numbers: 13-19 digits passing the Luhn check;
- Chinese resident ID numbers: 18 characters, a plausible birth date and the GB 11643-1999
  check character (ISO 7064 MOD 11-2);
- US Social Security numbers in their printed form (AAA-GG-SSSS; area not 000, 666 or 9xx,
  group not 00, serial not 0000).
"""

from __future__ import annotations

def luhn_ok(digits: str) -> bool:
    """The Luhn check of payment card numbers: double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_ID_WEIGHTS = [2 ** (17 - i) % 11 for i in range(17)]  # 7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2


def cn_id_check_char(first17: str) -> str:
    """GB 11643-1999: the 18th character of a resident ID number from the first 17 digits."""
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS)) % 11]


def cn_id_ok(number: str) -> bool:
    number = number.upper()
    if len(number) != 18 or not number[:17].isdigit():
        return False
    year, month, day = int(number[6:10]), int(number[10:12]), int(number[12:14])
    if not (1900 <= year <= 2100 and 1 <= month <= 12 and 1 <= day <= 31):
        return False
    return cn_id_check_char(number[:17]) == number[17]


def ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit() or c in "xX")


def _card(m: str) -> str | None:
    d = _digits(m)
    return "[card]" if 13 <= len(d) <= 19 and d.isdigit() and luhn_ok(d) else None


def _cn_id(m: str) -> str | None:
    return "[id]" if cn_id_ok(m) else None


def _ssn(m: str) -> str | None:
    d = _digits(m)
    return "[id]" if ssn_ok(d[:3], d[3:5], d[5:]) else None


def _nanp(m: str) -> str | None:
    d = _digits(m)
    d = d[1:] if len(d) == 11 and d[0] == "1" else d
    if len(d) != 10 or d[0] in "01" or d[3] in "01":
        return None
    if d[3:6] == "555" and d[6:8] == "01":  # 555-0100 to 555-0199: reserved for fiction
        return None
    return "[phone]"


def _phone(m: str) -> str | None:
    return "[phone]" if 7 <= len(_digits(m)) <= 15 else None


def _email(m: str) -> str | None:
    return "[email]"


# Personal data, most specific first: a match overlapping one kept earlier is dropped.
PII = [
    ("pii_email", r"(?<![\w.+-])[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}(?![\w-])", _email),
    ("pii_cn_id", r"(?<![0-9a-z])\d{17}[0-9x](?![0-9a-z])", _cn_id),
    ("pii_card", r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])", _card),
    ("pii_ssn", r"(?<![\d-])\d{3}[- ]\d{2}[- ]\d{4}(?![\d-])", _ssn),
    ("pii_cn_mobile", r"(?<![\d+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)", _phone),
    ("pii_cn_landline", r"(?<![\d-])(?:\(0\d{2,3}\)\s?|0\d{2,3}-)\d{3,4}-?\d{4}(?![\d-])", _phone),
    ("pii_phone_nanp", r"(?<![\d+])(?:\+?1[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)", _nanp),
    ("pii_phone_uk", r"(?<![\d+])(?:\+44\s?7\d{3}|07\d{3})\s?\d{3}\s?\d{3}(?!\d)", _phone),
    ("pii_phone_intl", r"(?<![\w+])\+(?:[2-9]\d{0,2})[ .-]?\d{1,4}(?:[ .-]?\d{2,4}){2,4}(?!\d)", _phone),
]


PII_RULES = tuple(name for name, _, _ in PII)
