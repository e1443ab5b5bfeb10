"""Guardrails: input rails run on what a client sends before the model sees it, output rails on what
the model answers before the client sees it (also while it streams).

The rails, in the order they run:
- characters: control characters and chat-template tokens (`<|im_start|>`), which forge turns;
- length: the longest input a persona takes;
- injection: attempts to override the system prompt or make the assistant reveal it (English and
  Spanish heuristics); on the output side, an answer that quotes the system prompt;
- blocklist: words and regular expressions from the config;
- topics: built-in phrase rules for blatant requests in the Llama Guard 3 categories (S1-S14);
- pii: emails, phone numbers (and Argentina's, Mexico's, Chile's and Colombia's by phonenumbers), card
  numbers (Luhn), IBANs (mod 97), Spanish DNI/NIE (check letter), Argentine DNI and CUIT, Mexican CURP and
  RFC, Chilean RUT, Colombian cédula (python-stdnum's check digits) and IP addresses, each blocked,
  redacted or allowed as the config says;
- safety: a classifier asked the Llama Guard 3 question, a model forja loads or an OpenAI-compatible
  endpoint, answering `safe` or `unsafe` and the categories.

A blocked request gets a fixed, polite refusal for its category (never its own text back). Whatever
the actions, PII is redacted from everything forja stores (`redact`).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forja.config import ForjaError, RailsSettings, SafetySettings, Settings

log = logging.getLogger("forja.guard")
SAFETY_CATEGORIES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation", "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy",
    "S8": "Intellectual Property", "S9": "Indiscriminate Weapons", "S10": "Hate",
    "S11": "Suicide & Self-Harm", "S12": "Sexual Content", "S13": "Elections", "S14": "Code Interpreter Abuse",
}
# Categories a finding can carry besides S1-S14
RAIL_CATEGORIES = ("characters", "length", "injection", "blocklist", "pii", "safety")


class GuardError(ForjaError):
    """A rail that cannot run as configured (a bad regular expression, an unreachable classifier)."""


@dataclass
class Finding:
    """One rail decision: which rule matched, its category, and what was done (block, redact, flag, allow)."""

    stage: str  # "input" or "output"
    rule: str  # e.g. "pii.email", "injection.override", "topics", "safety"
    category: str  # a RAIL_CATEGORIES entry or S1..S14
    action: str
    span: tuple[int, int] | None = None  # where in the checked text (redactions)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "rule": self.rule, "category": self.category, "action": self.action}


@dataclass
class Verdict:
    """The rails' answer for one text: the text to go on with (redacted) or a refusal."""

    text: str
    findings: list[Finding] = field(default_factory=list)
    refusal: str | None = None
    texts: list[str] = field(default_factory=list)  # input: every checked text, redacted

    @property
    def blocked(self) -> bool:
        return self.refusal is not None

    @property
    def categories(self) -> list[str]:
        return sorted({f.category for f in self.findings if f.action == "block"})


# ------------------------------------------------------------------------------------------------
# Text normalisation: rules match case- and accent-insensitively, ignoring zero-width characters

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.translate(_ZERO_WIDTH).casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", text)


def _rx(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


# ------------------------------------------------------------------------------------------------
# PII: candidates by regular expression, confirmed by a checksum where the entity has one

def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def luhn_ok(number: str) -> bool:
    digits = [int(d) for d in _digits(number)]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    iban = re.sub(r"\s", "", candidate).upper()
    if not 15 <= len(iban) <= 34:
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def national_id_ok(candidate: str) -> bool:
    """Spanish DNI (8 digits + letter) or NIE (X/Y/Z + 7 digits + letter) with the right check letter."""
    value = re.sub(r"[\s-]", "", candidate).upper()
    if value[0] in "XYZ":
        value = str("XYZ".index(value[0])) + value[1:]
    return value[:-1].isdigit() and len(value) == 9 and _DNI_LETTERS[int(value[:-1]) % 23] == value[-1]


def ip_ok(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def phone_ok(candidate: str) -> bool:
    """International numbers have 9-15 digits with the country code; national ones 9 (Spain) or 10 (North America)."""
    digits = len(_digits(candidate))
    return 9 <= digits <= 15 if candidate.startswith("+") else digits in (9, 10)


# entity → (regex, validator, placeholder)
PII_ENTITIES: dict[str, tuple[re.Pattern[str], Callable[[str], bool], str]] = {
    "email": (re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-z]{2,}(?![\w-])", re.I), lambda s: True, "[EMAIL]"),
    "credit_card": (re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), luhn_ok, "[CARD]"),
    "iban": (re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])"), iban_ok, "[IBAN]"),
    "national_id": (re.compile(r"(?<![\w-])(?:\d{8}|[xyz][ -]?\d{7})[ -]?[a-z](?![\w-])", re.I), national_id_ok, "[NATIONAL_ID]"),
    "phone": (re.compile(
        r"(?<![\w+])(?:"
        r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}"  # international: +34 612 345 678
        r"|[6789]\d{2}(?:[ .-]?\d{2,3}){2,3}|[89]\d(?:[ .-]?\d{2,3}){3}"  # Spanish: 612 345 678, 91 123 45 67
        r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4}"  # North American: (555) 123-4567
        r")(?![\w])"), phone_ok, "[PHONE]"),
    "ip_address": (re.compile(r"(?<![\w.:])(?:(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)|(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?!\w|[.:]\w))", re.I),
                   ip_ok, "[IP]"),
}


# The formats of Spanish-speaking countries beyond Spain, each confirmed by its check digit where it has one
# (python-stdnum): Argentine CUIT/CUIL (mod 11), Mexican CURP and RFC (their check characters), Chilean RUT
# (mod 11, written with its dash), and, having no check digit, the Argentine DNI and the Colombian cédula
# only after the word that names them ("DNI 30.123.456", "C.C. 1.020.304.050"). Phone numbers of
# Argentina, Mexico, Chile and Colombia are those phonenumbers takes as valid numbers of the country:
# international (+54 9 341 555 0192) or national with separators (0341 15-555-0192, 55 1234 5678).
_ID_WORD_NUMBER = r"(?:\s*(?:n[°º.o]*|nro\.?|num(?:ero)?\.?|#))?\s*:?\s*"
_LATAM_IDS: list[tuple[re.Pattern[str], Callable[[str], bool]]] = []
_LATAM_PHONE_CANDIDATE = re.compile(r"(?<![\w+.,/-])(?:\+\d{2}|\(?0)?[ .-]?\(?\d[\d ().-]{6,16}\d(?![\w]|[.,-]\d)")
LATAM_PHONE_REGIONS = ("AR", "MX", "CL", "CO")


def _latam_ids() -> list[tuple[re.Pattern[str], Callable[[str], bool]]]:
    if not _LATAM_IDS:
        from stdnum.ar import cuit, dni
        from stdnum.cl import rut
        from stdnum.mx import curp, rfc

        _LATAM_IDS.extend([
            (re.compile(r"(?<![\w.-])(?:20|23|24|27|30|33|34)[ -]?\d{8}[ -]?\d(?![\w-])"), cuit.is_valid),
            (re.compile(r"(?<!\w)[A-Z]{4}\d{6}[HMX][A-Z]{5}[A-Z\d]\d(?!\w)", re.I), lambda v: curp.is_valid(v.upper())),
            (re.compile(r"(?<![\w&])[A-ZÑ&]{3,4}[ -]?\d{6}[ -]?[A-Z\d]{3}(?!\w)", re.I),
             lambda v: rfc.is_valid(v.upper(), validate_check_digits=True)),
            (re.compile(r"(?<![\w.-])\d{1,2}\.?\d{3}\.?\d{3}-[\dk](?![\w-])", re.I), rut.is_valid),
            (re.compile(r"\b(?:DNI|D\.N\.I\.?|documento(?: nacional)?(?: de identidad)?)" + _ID_WORD_NUMBER
                        + r"(?P<value>\d{1,2}\.?\d{3}\.?\d{3})(?![\w-]|[.,]\d)", re.I), dni.is_valid),
            (re.compile(r"(?:\bc[ée]dula(?: de ciudadan[íi]a)?|\bC\.\s?C\.?|\bCC)" + _ID_WORD_NUMBER
                        + r"(?P<value>\d{1,3}(?:\.?\d{3}){1,3})(?![\w-]|[.,]\d)", re.I),
             lambda v: 6 <= len(_digits(v)) <= 10),
        ])
    return _LATAM_IDS


def latam_id_spans(text: str) -> Iterable[tuple[int, int]]:
    """Spans of valid Argentine, Mexican, Chilean and Colombian ID numbers in `text`."""
    for pattern, valid in _latam_ids():
        for m in pattern.finditer(text):
            group = "value" if "value" in pattern.groupindex else 0
            if valid(m.group(group)):
                yield m.span(group)


def latam_phone_spans(text: str) -> Iterable[tuple[int, int]]:
    """Spans of valid Argentine, Mexican, Chilean and Colombian phone numbers: international ones, and
    national ones of at least 9 digits written with separators (a bare run of digits is an order number)."""
    if not any(c.isdigit() for c in text):
        return
    import phonenumbers

    for m in _LATAM_PHONE_CANDIDATE.finditer(text):
        value = m.group().strip(" .-")
        start = m.start() + m.group().index(value)
        if value.startswith("+"):
            regions: tuple[str | None, ...] = (None,)
        elif len(_digits(value)) >= 9 and re.search(r"[ ().-]", value):
            regions = LATAM_PHONE_REGIONS
        else:
            continue
        for region in regions:
            try:
                number = phonenumbers.parse(value, region)
            except phonenumbers.NumberParseException:
                continue
            if (phonenumbers.is_valid_number(number)
                    and phonenumbers.region_code_for_number(number) in LATAM_PHONE_REGIONS):
                yield start, start + len(value)
                break


MORE_PII_FORMATS: dict[str, tuple[Callable[[str], Iterable[tuple[int, int]]], ...]] = {
    "national_id": (latam_id_spans,),
    "phone": (latam_phone_spans,),
}


def find_pii(text: str, allow: Iterable[str] = ()) -> list[tuple[str, int, int]]:
    """(entity, start, end) of every PII entity in `text`, earlier entities in PII_ENTITIES winning overlaps
    (within an entity, its pattern before its MORE_PII_FORMATS)."""
    allowed = {a.casefold() for a in allow}
    found: list[tuple[str, int, int]] = []

    def take(entity: str, start: int, end: int) -> None:
        if text[start:end].casefold() in allowed or any(s < end and start < e for _, s, e in found):
            return
        found.append((entity, start, end))

    for entity, (pattern, valid, _) in PII_ENTITIES.items():
        for m in pattern.finditer(text):
            start, value = m.start(), m.group()
            while not valid(value) and entity == "iban" and " " in value:  # a word after it read as its last group
                value = value.rsplit(" ", 1)[0]
            if valid(value):
                take(entity, start, start + len(value))
        for finder in MORE_PII_FORMATS.get(entity, ()):
            for start, end in finder(text):
                take(entity, start, end)
    return sorted(found, key=lambda f: f[1])


def published_pii(rows: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    """The phone numbers, emails, ... that training rows' answers give: the owner wrote them for the model to
    say (the shop's phone in its FAQ), so the output rails must not redact them. Users' turns are not read."""
    found: dict[str, None] = {}
    for row in rows:
        for message in row.get("messages") or []:
            if message.get("role") == "assistant":
                text = message.get("content", "")
                found.update((text[start:end], None) for _, start, end in find_pii(text))
    return tuple(sorted(found))


def redact(text: str, allow: Iterable[str] = ()) -> str:
    """`text` with every PII entity replaced by its placeholder ([EMAIL], [CARD], ...)."""
    return _replace(text, [(s, e, PII_ENTITIES[entity][2]) for entity, s, e in find_pii(text, allow)])


def _replace(text: str, spans: list[tuple[int, int, str]]) -> str:
    out, last = [], 0
    for start, end, placeholder in sorted(spans):
        out += [text[last:start], placeholder]
        last = end
    return "".join(out) + text[last:]


def redact_messages(messages: Any, allow: Iterable[str] = ()) -> Any:
    """Chat messages or a prompt string (or a list of them) with PII redacted, for storing."""
    if isinstance(messages, str):
        return redact(messages, allow)
    if isinstance(messages, list):
        return [redact_messages(m, allow) for m in messages]
    if isinstance(messages, dict) and isinstance(messages.get("content"), str):
        return {**messages, "content": redact(messages["content"], allow)}
    return messages


def redact_values(value: Any, allow: Iterable[str] = ()) -> Any:
    """Every string in a JSON value (a tool call's arguments, its keys aside) with PII redacted, for storing."""
    if isinstance(value, str):
        return redact(value, allow)
    if isinstance(value, list):
        return [redact_values(v, allow) for v in value]
    if isinstance(value, dict):
        return {k: redact_values(v, allow) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------------
# Injection, characters and topics: rules on normalised text

_REVEAL_EN = r"\b(reveal|show|print|repeat|tell|give|output|display|leak|dump|what (is|are|was|were))\b"
_REVEAL_ES = r"\b(muestra|muestrame|revela|revelame|dime|ensename|repite|imprime|escribe|cuales son|cual es|cuales eran)\b"
INJECTION_RULES = {
    "injection.override": _rx(
        r"\b(ignore|disregard|forget|override|bypass)\b.{0,30}\b(previous|prior|above|earlier|all|your|system|initial|original)\b"
        r".{0,20}\b(instructions?|rules|prompts?|guidelines|directives)\b",
        r"\b(ignore|disregard|forget)\b.{0,20}\b(instructions|rules|guidelines)\b.{0,10}\b(you (were|have been) (given|told)|given to you)\b",
        r"\b(ignora|ignore|olvida|olvide|omite|descarta|saltate)\b.{0,20}\b(instrucciones|reglas|indicaciones|ordenes|normas|directrices)"
        r"\s+(anteriores|previas|de arriba|iniciales|originales|del sistema)\b",
        r"\b(ignora|ignore|olvida|olvide|omite|descarta|saltate)\s+(todas\s+)?(tus|sus)\s+(instrucciones|reglas|normas|directrices)\b",
        r"\bnew (system )?instructions?\s*:", r"\bnuevas? instrucci(on|ones)( del sistema)?\s*:",
    ),
    "injection.reveal": _rx(
        _REVEAL_EN + r".{0,30}\b(system|initial|hidden|secret|developer) prompt\b",
        _REVEAL_EN + r".{0,20}\byour\s+(system\s+|initial\s+|original\s+|hidden\s+|secret\s+)?(prompt|instructions)\b",
        r"\b(repeat|print|output)\b.{0,20}\b(everything|all|the text|the words)\b.{0,20}\b(above|before)\b",
        r"\b(prompt|mensaje)\s+(de|del)\s+sistema\b",
        _REVEAL_ES + r".{0,30}\b(tus|las)\s+(instrucciones|reglas|indicaciones)\s+(iniciales|originales|ocultas|secretas|de sistema|del sistema)\b",
        _REVEAL_ES + r".{0,20}\btus\s+instrucciones\b",
    ),
    "injection.roleplay": _rx(
        r"\b(you are|you're) (now )?(dan|jailbroken|unrestricted|unfiltered|free from)\b", r"\b(developer|god|dan) mode\b",
        r"\bjailbreak", r"\b(pretend|act as if|imagine) (that )?(you have|there are) no (rules|restrictions|filters|guidelines|limits)\b",
        r"\bwithout (any )?(restrictions|filters|censorship|rules|limits)\b",
        r"\bmodo (desarrollador|dios|dan|sin restricciones|sin censura)\b", r"\bsin (ninguna )?(restriccion|restricciones|filtros|censura|limites|reglas)\b",
        r"\bahora eres\b.{0,30}\b(dan|libre|sin (reglas|restricciones|limites))\b",
    ),
}
CHAT_TOKENS = re.compile(r"<\|[a-z_]{2,30}\|>|\[/?inst\]|<</?sys>>", re.I)  # in documents ("Sistema:" is a word there)
TEMPLATE_TOKENS = re.compile(r"<\|[a-z_]{2,30}\|>|</?s>|\[/?inst\]|<</?sys>>|^\s*(system|sistema)\s*:", re.I | re.M)
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069]")


def refused_characters(text: str) -> str | None:
    """What the characters rail refuses in `text`, in words (for an error message), or None. Text that is
    stored to train on (feedback corrections) must pass it whatever the rails' settings."""
    if CONTROL_CHARS.search(text):
        return "a control character (such as NUL) or a text-direction override"
    if TEMPLATE_TOKENS.search(text):
        return "chat-template markup (such as <|im_start|> or a line starting 'system:'), which forges turns"
    return None

# Built-in phrase rules for blatant requests, by Llama Guard 3 category; patterns see normalised text
# (lower case, no accents). They catch the obvious phrasings only; the safety classifier does the rest.
TOPIC_RULES: dict[str, re.Pattern[str]] = {
    "S1": _rx(
        r"\b(how (do i|to|can i|would i)|help me|best way to|teach me to)\b.{0,30}\b(kill|murder|poison|stab|strangle|kidnap|torture|shoot)\b"
        r".{0,25}\b(someone|somebody|a person|people|him|her|my (wife|husband|boss|neighbou?r|partner|father|mother|family|teacher))\b",
        r"\b(como|ayudame a|mejor (forma|manera) de|quiero|ensename a)\b.{0,30}\b(matar|asesinar|envenenar|apunalar|secuestrar|torturar|disparar)\b"
        r".{0,25}\b(a alguien|a una persona|a la gente|a (mi|mis) (mujer|esposa|marido|jefe|vecino|pareja|padre|madre|familia|profesor))",
    ),
    "S2": _rx(
        r"\b(hack|break) into\b.{0,30}\b(account|email|wifi|computer|server|phone|bank)", r"\bsteal\b.{0,25}\b(credit cards?|identit(y|ies)|passwords?|money|cars?)\b",
        r"\blaunder(ing)? money\b|\bmoney laundering\b", r"\b(make|buy|sell|cook|synthesi[sz]e)\b.{0,15}\b(meth|methamphetamine|cocaine|heroin|fentanyl|crack)\b",
        r"\bphishing (email|page|site|kit)\b", r"\b(write|make|create|build)\b.{0,20}\bransomware\b",
        r"\b(hackear|piratear|entrar en)\b.{0,20}\b(la|el|una|un)?\s?(cuenta|correo|wifi|ordenador|servidor|movil|banco)\b",
        r"\brobar\b.{0,25}\b(tarjetas?|identidad(es)?|contrasenas?|dinero|coches?)\b", r"\bblanque(ar|o de) (dinero|capitales)\b",
        r"\b(fabricar|cocinar|hacer|vender|sintetizar)\b.{0,15}\b(metanfetamina|cocaina|heroina|fentanilo|crack)\b",
        r"\b(correo|pagina|web) de phishing\b",
    ),
    "S3": _rx(r"\b(drug|roofie)\b.{0,20}\b(her|him|someone|a girl|a woman)\b.{0,20}\b(drink|sex)\b",
              r"\bdrogar a\b.{0,20}\b(una chica|una mujer|alguien)\b"),
    "S4": _rx(
        r"\b(child|children|minor|minors|underage|kids?)\b.{0,30}\b(sex|sexual|porn|nude|naked|erotic)",
        r"\b(sex|sexual|porn|nude|naked|erotic)\w*\b.{0,30}\b(child|children|minor|minors|underage|kids?)\b",
        r"\b(nino|nina|ninos|ninas|menor|menores)\b.{0,30}\b(sexo|sexual|porno|desnud|erotic)",
        r"\b(sexo|sexual|porno|desnud|erotic)\w*\b.{0,30}\b(nino|nina|ninos|ninas|menor|menores)\b",
    ),
    "S7": _rx(r"\b(find|give me|look up|tell me)\b.{0,25}\b(home address|personal phone number|social security number)\b.{0,10}\bof\b",
              r"\b(dame|busca|encuentra|dime)\b.{0,25}\b(direccion de casa|domicilio|numero de la seguridad social)\b.{0,10}\bde\b"),
    "S9": _rx(
        r"\b(make|build|create|synthesi[sz]e|produce|assemble|manufacture)\b.{0,30}\b(a bomb|bombs|explosives?|pipe bomb|nerve (gas|agent)|sarin|anthrax"
        r"|bioweapons?|chemical weapons?|dirty bomb|nuclear weapons?|napalm|molotov)\b",
        r"\b(fabricar|hacer|construir|crear|sintetizar|preparar)\b.{0,30}\b(una bomba|bombas|explosivos?|gas (nervioso|sarin)|sarin|antrax"
        r"|armas? (quimicas?|biologicas?|nucleares?)|napalm|coctel(es)? molotov)\b",
    ),
    "S10": _rx(
        r"\b(all|every)\b.{0,20}\b(jews|muslims|blacks|gays|immigrants|women|mexicans|gypsies)\b.{0,20}\b(should (die|be killed|be exterminated)|are (subhuman|vermin|animals))",
        r"\binferior race\b|\bsubhuman\b",
        r"\b(todos los|todas las)\b.{0,20}\b(judios|musulmanes|negros|gays|inmigrantes|mujeres|gitanos)\b.{0,20}\b(deberian morir|son (infrahumanos|animales|basura|ratas))",
        r"\braza inferior\b|\bexterminar a (los|las|todos)\b",
    ),
    "S11": _rx(
        r"\b(kill myself|end my life|commit suicide|suicide methods?|ways to (die|kill myself)|hurt myself|cut myself|want to die)\b",
        r"\b(suicidarme|quitarme la vida|matarme|acabar con mi vida|hacerme dano|cortarme las venas|quiero morir(me)?|formas? de (suicidarse|suicidarme|morir))\b",
    ),
    "S12": _rx(r"\b(write|describe|tell me)\b.{0,30}\b(explicit|graphic|erotic|porn\w*)\b.{0,20}\b(sex|story|scene)",
               r"\b(escribe|describe|cuentame)\b.{0,30}\b(historia|escena|relato)\b.{0,20}\b(sexual(es)? explicit|erotic|porno)"),
}

# ------------------------------------------------------------------------------------------------
# Refusals: fixed per category and language; the config's `refusals` overrides any of them

REFUSALS = {
    "en": {
        "characters": "Your message contains characters or markup I can't accept. Please send it again as plain text.",
        "length": "Your message is too long for me. Please shorten it and try again.",
        "injection": "I can't change or share my instructions, but I'm glad to help with your question.",
        "blocklist": "I'm sorry, I can't help with that topic.",
        "pii": "For your safety I can't take personal data such as {entity} here. Please remove it and ask again.",
        "output.pii": "I'm sorry, I can't share that answer because it contains personal data.",
        "S11": "I'm really sorry you're going through this. I can't help with that, but you don't have to face it "
               "alone: in Spain call 024 (free, 24 hours) or 112 in an emergency; elsewhere findahelpline.com lists free lines.",
        "safety": "I'm sorry, I can't help with that request.",
        "output": "I'm sorry, I can't share that answer.",
    },
    "es": {
        "characters": "Tu mensaje contiene caracteres o marcas que no puedo aceptar. Envíalo de nuevo como texto normal.",
        "length": "Tu mensaje es demasiado largo para mí. Acórtalo y vuelve a intentarlo.",
        "injection": "No puedo cambiar ni compartir mis instrucciones, pero con gusto te ayudo con tu pregunta.",
        "blocklist": "Lo siento, no puedo ayudarte con ese tema.",
        "pii": "Por tu seguridad no puedo recibir datos personales como {entity} aquí. Quítalos y pregunta de nuevo.",
        "output.pii": "Lo siento, no puedo compartir esa respuesta porque contiene datos personales.",
        "S11": "Siento mucho que estés pasando por esto. No puedo ayudarte con eso, pero no tienes que afrontarlo "
               "solo: en España llama al 024 (gratuito, 24 horas) o al 112 en una emergencia; en otros países, "
               "findahelpline.com reúne líneas gratuitas.",
        "safety": "Lo siento, no puedo ayudarte con esa petición.",
        "output": "Lo siento, no puedo compartir esa respuesta.",
    },
}
ENTITY_NAMES = {
    "en": {"email": "an email address", "phone": "a phone number", "credit_card": "a card number", "iban": "a bank account (IBAN)",
           "national_id": "an ID number", "ip_address": "an IP address"},
    "es": {"email": "un correo electrónico", "phone": "un teléfono", "credit_card": "un número de tarjeta",
           "iban": "una cuenta bancaria (IBAN)", "national_id": "un número de DNI/NIE", "ip_address": "una dirección IP"},
}
_SPANISH = re.compile(r"[ñ¿¡áéíóú]|\b(que|de|el|la|los|las|por|para|como|es|una|mi|tu|con|del|se|al|quiero|puedo|hola|dime)\b")
_ENGLISH = re.compile(r"\b(the|is|to|how|what|and|of|you|my|can|i|do|in|are|please|hello|tell|me)\b")


def language_of(text: str) -> str:
    lowered = text.casefold()
    return "es" if len(_SPANISH.findall(lowered)) > len(_ENGLISH.findall(lowered)) else "en"


# ------------------------------------------------------------------------------------------------
# The safety classifier: the Llama Guard 3 question, asked of a model or an endpoint

def llama_guard_question(conversation: list[dict[str, str]], role: str, categories: Iterable[str]) -> str:
    """The Llama Guard 3 task for the last `role` ("User" or "Agent") message of `conversation`."""
    policy = "\n".join(f"{c}: {SAFETY_CATEGORIES[c]}." for c in categories)
    turns = "\n\n".join(f"{'User' if m['role'] == 'user' else 'Agent'}: {m['content']}" for m in conversation
                        if m["role"] in ("user", "assistant"))
    return (f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
            f"policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{policy}\n<END UNSAFE CONTENT "
            f"CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{turns}\n\n<END CONVERSATION>\n\nProvide your safety assessment "
            f"for ONLY THE LAST {role} message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n"
            " - If unsafe, a second line must include a comma-separated list of violated categories.")


def parse_llama_guard(answer: str) -> tuple[bool, list[str]]:
    """`safe` → (True, []); `unsafe\\nS1,S10` → (False, ["S1", "S10"]); anything else raises GuardError."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    verdict = lines[0].casefold().strip(" .'\"") if lines else ""
    if verdict == "safe":
        return True, []
    if verdict == "unsafe":
        found = re.findall(r"\bS(\d{1,2})\b", " ".join(lines[1:]), re.I)
        return False, [f"S{int(n)}" for n in dict.fromkeys(found) if 1 <= int(n) <= 14]
    raise GuardError(f"the safety classifier answered {answer[:60]!r}, not 'safe' or 'unsafe'")


class SafetyClassifier:
    """Asks `settings.model` (any model forja loads) or `settings.endpoint` (an OpenAI-compatible API) the
    Llama Guard 3 question. Thread-safe; a local model is loaded on first use and kept."""

    def __init__(self, config: SafetySettings, settings: Settings):
        self.config, self.settings = config, settings
        self._engine: Any = None
        self._lock = threading.Lock()

    def classify(self, conversation: list[dict[str, str]], role: str) -> tuple[bool, list[str]]:
        question = llama_guard_question(conversation, role, SAFETY_CATEGORIES)
        answer = self._ask_endpoint(conversation, question) if self.config.endpoint else self._ask_model(question)
        return parse_llama_guard(answer)

    def _ask_endpoint(self, conversation: list[dict[str, str]], question: str) -> str:
        import httpx

        if self.config.template == "server":  # a Llama Guard server writes the question with its own template
            messages = [m for m in conversation if m["role"] in ("user", "assistant")]
        else:
            messages = [{"role": "user", "content": question}]
        headers = {"Authorization": f"Bearer {self.config.api_key.get_secret_value()}"} if self.config.api_key else {}
        url = self.config.endpoint.rstrip("/") + "/chat/completions"  # type: ignore[union-attr]
        try:
            response = httpx.post(url, headers=headers, timeout=self.config.timeout, json={
                "model": self.config.endpoint_model, "messages": messages, "max_tokens": 20, "temperature": 0})
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise GuardError(f"safety classifier at {url}: {exc}") from None

    def _ask_model(self, question: str) -> str:
        from forja.engine import SamplingParams, answer, make_engine, run_coroutine

        with self._lock:  # one engine, made on first use; calls come from the server's worker threads
            if self._engine is None:
                self._engine = make_engine(self.config.model, self.settings)  # type: ignore[arg-type]
        engine = self._engine
        reply = run_coroutine(lambda: answer(engine, [{"role": "user", "content": question}],
                                             SamplingParams(max_new_tokens=12, temperature=0.0)))
        if reply.finish_reason == "error":  # e.g. a conversation longer than the classifier's context
            raise GuardError(f"safety classifier {self.config.model}: {reply.error}")
        return reply.text

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


# ------------------------------------------------------------------------------------------------
# The rails of one persona


class Guard:
    """Input and output rails with one persona's settings. `check_input` / `check_output` for whole
    texts; `output_filter()` for an answer that streams."""

    def __init__(self, rails: RailsSettings, classifier: SafetyClassifier | None = None, system: str | None = None):
        self.rails, self.classifier = rails, classifier
        try:
            self.blocklist = _rx(*[rf"(?<!\w){re.escape(normalize(w))}(?!\w)" for w in rails.blocklist]) if rails.blocklist else None
            self.patterns = [re.compile(p, re.I) for p in rails.block_patterns]
        except re.error as exc:
            raise GuardError(f"guard.block_patterns: not a valid regular expression ({exc})") from None
        self.system_shingles = _shingles(normalize(system)) if system else set()

    def redact(self, value: Any) -> Any:
        """Messages, prompts or answers with PII redacted for storing, whatever the rails' actions (unless
        redact_logs is off); this persona's `pii.allow` values are kept."""
        return redact_messages(value, self.rails.pii.allow) if self.rails.redact_logs else value

    def redact_arguments(self, value: Any) -> Any:
        """A tool call's arguments with PII redacted for storing, as `redact` does for messages."""
        return redact_values(value, self.rails.pii.allow) if self.rails.redact_logs else value

    # -------------------------------------------------------------- whole texts

    def check_input(self, conversation: list[dict[str, str]] | str) -> Verdict:
        """Check what a client sent: chat messages (its user and assistant turns, not the persona's system
        prompt) or a prompt string. The verdict holds every checked text, redacted; `apply_input` puts them
        back in the conversation."""
        texts = self._client_texts(conversation)
        if not self.rails.enabled:
            return Verdict(texts[-1] if texts else "", texts=texts)
        findings: list[Finding] = []
        redacted = []
        language = self.language(" ".join(texts[-1:]))
        if self.input_chars(conversation) > self.rails.max_input_chars:
            findings.append(Finding("input", "length", "length", "block"))
        for text in texts:
            findings += self._text_rules("input", text)
            pii = self._pii("input", text)
            findings += pii
            redacted.append(_redacted(text, pii))
        verdict = Verdict(redacted[-1] if redacted else "", findings, texts=redacted)
        self._decide(verdict, "input", language)
        if not verdict.blocked and self.classifier and "input" in self.classifier.config.stages:
            chat = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
            self._classify(verdict, "input", self.apply_input(chat, verdict), "User", language)
        return verdict

    @staticmethod
    def _client_texts(conversation: list[dict[str, str]] | str) -> list[str]:
        return [conversation] if isinstance(conversation, str) else [
            m["content"] for m in conversation if m.get("role") != "system" and isinstance(m.get("content"), str)]

    def input_chars(self, conversation: list[dict[str, str]] | str) -> int:
        """The length `max_input_chars` limits: the longest message the client sent (not the persona's system
        prompt). Per message, not all together: a long chat (a page resends its history, a conversation kept
        on the server grows) must keep answering; its whole length is bounded by the model's context (and a
        conversation kept on the server is summarised) and the body by serve.max_body_bytes."""
        return max((len(t) for t in self._client_texts(conversation)), default=0)

    def apply_input(self, conversation: Any, verdict: Verdict) -> Any:
        """The conversation with the verdict's redactions applied."""
        redacted = iter(verdict.texts)
        if isinstance(conversation, str):
            return next(redacted, conversation)
        return [m if m.get("role") == "system" or not isinstance(m.get("content"), str) else {**m, "content": next(redacted)}
                for m in conversation]

    def check_document(self, text: str) -> list[Finding]:
        """A retrieved chunk is text no user sent and no rail has seen: an instruction hidden in a document (the
        injection rules, chat-template tokens) is an injection. With guard.injection at block the chunk is kept
        out of the prompt (the finding says "block"); at flag it is kept and recorded."""
        if not self.rails.enabled or self.rails.injection == "off":
            return []
        norm, action = normalize(text), self.rails.injection
        found = [Finding("retrieval", rule, "injection", action) for rule, rx in INJECTION_RULES.items() if rx.search(norm)]
        if CHAT_TOKENS.search(text):
            found.append(Finding("retrieval", "characters.template_tokens", "injection", action))
        return found

    def check_output(self, text: str, conversation: list[dict[str, str]] | None = None, language: str | None = None) -> Verdict:
        """Check a whole answer (refusals in the user's language, else the answer's)."""
        stream = self.output_filter(conversation, language or self.language(_last_user(conversation) or text))
        released = stream.feed(text) + stream.finish()
        return Verdict(released if not stream.verdict.blocked else stream.verdict.refusal or "", stream.verdict.findings,
                       stream.verdict.refusal)

    def output_filter(self, conversation: list[dict[str, str]] | None = None, language: str | None = None) -> "OutputFilter":
        return OutputFilter(self, conversation or [], language or self.language(_last_user(conversation)))

    # -------------------------------------------------------------- the rules

    def _text_rules(self, stage: str, text: str) -> list[Finding]:
        """Characters, injection, blocklist and topics on one text."""
        rails, found = self.rails, []
        norm = normalize(text)
        if stage == "input" and rails.characters == "block":
            if CONTROL_CHARS.search(text):
                found.append(Finding(stage, "characters.control", "characters", "block"))
            if TEMPLATE_TOKENS.search(text):
                found.append(Finding(stage, "characters.template_tokens", "injection", "block"))
        if rails.injection != "off":
            if stage == "input":
                found += [Finding(stage, rule, "injection", rails.injection) for rule, rx in INJECTION_RULES.items() if rx.search(norm)]
            elif self.system_shingles and self.system_shingles & _shingles(norm):
                found.append(Finding(stage, "injection.system_prompt_leak", "injection", rails.injection))
        if self.blocklist is not None and self.blocklist.search(norm):
            found.append(Finding(stage, "blocklist.words", "blocklist", "block"))
        found += [Finding(stage, f"blocklist.pattern{i}", "blocklist", "block") for i, rx in enumerate(self.patterns) if rx.search(text)]
        if rails.topics != "off":
            found += [Finding(stage, "topics", category, rails.topics) for category, rx in TOPIC_RULES.items()
                      if category in rails.safety_categories and rx.search(norm)]
        return found

    def _pii(self, stage: str, text: str) -> list[Finding]:
        actions = self.rails.pii.model_dump(exclude={"allow"})
        return [Finding(stage, f"pii.{entity}", "pii", actions[entity], (start, end))
                for entity, start, end in find_pii(text, self.rails.pii.allow)]

    def _classify(self, verdict: Verdict, stage: str, conversation: list[dict[str, str]], role: str, language: str) -> None:
        config = self.classifier.config  # type: ignore[union-attr]
        try:
            safe, categories = self.classifier.classify(conversation, role)  # type: ignore[union-attr]
        except GuardError as exc:
            log.warning("%s (on_error: %s)", exc, config.on_error)
            verdict.findings.append(Finding(stage, "safety.error", "safety", config.on_error))
            if config.on_error == "block":
                verdict.refusal = self._refusal("safety", stage, language)
            return
        if not safe:
            # "unsafe" without categories still blocks, as the generic category "safety"
            blocked = [c for c in categories if c in self.rails.safety_categories] if categories else ["safety"]
            verdict.findings += [Finding(stage, "safety", c, "block" if c in blocked else "flag") for c in categories or blocked]
            if blocked:
                verdict.refusal = self._refusal(blocked[0], stage, language)

    def _decide(self, verdict: Verdict, stage: str, language: str) -> None:
        blocking = [f for f in verdict.findings if f.action == "block"]
        if blocking:
            first = blocking[0]
            entity = first.rule[4:] if first.category == "pii" else ""
            verdict.refusal = self._refusal(first.category, stage, language, entity)

    def _refusal(self, category: str, stage: str, language: str, entity: str = "") -> str:
        """The config's refusal for the most specific key it has, else the built-in one."""
        group = "safety" if category in SAFETY_CATEGORIES else category
        for key in (f"{stage}.{category}", category, f"{stage}.{group}", group):
            if key in self.rails.refusals:
                return self.rails.refusals[key]
        builtin = REFUSALS[language]
        keys = (category, group) if stage == "input" else (f"output.{category}", "S11" if category == "S11" else "output")
        text = next(builtin[key] for key in keys if key in builtin)
        return text.format(entity=ENTITY_NAMES[language].get(entity, ""))

    def language(self, text: str) -> str:
        """The language answers and refusals use for `text`: guard.language, or detected (es or en)."""
        return self.rails.language if self.rails.language != "auto" else language_of(text)


def _last_user(conversation: list[dict[str, str]] | None) -> str:
    return next((m["content"] for m in reversed(conversation or []) if m.get("role") == "user"), "")


def _redacted(text: str, pii: list[Finding]) -> str:
    """`text` with the PII findings whose action is redact replaced by their placeholders."""
    return _replace(text, [(f.span[0], f.span[1], PII_ENTITIES[f.rule[4:]][2]) for f in pii if f.action == "redact" and f.span])


def _shingles(norm: str, size: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", norm)
    if len(words) < size:
        return {tuple(words)} if len(words) >= 4 else set()
    return {tuple(words[i:i + size]) for i in range(len(words) - size + 1)}


class OutputFilter:
    """The output rails on an answer that arrives in pieces. `feed(delta)` returns the text safe to send
    now; text that could still be the start of a PII entity (a trailing number or word) is held back
    until the next piece shows what it is. With a safety classifier, text is released in chunks of
    `safety.stream_chunk_chars`, each checked (with what came before) before any of it is sent.
    Once `verdict.refusal` is set the answer is blocked: stop generating and send the refusal."""

    HOLD = re.compile(r"(?:[a-z]{2}\d{2})?[\d .()+/-]*\S*$", re.I)

    def __init__(self, guard: Guard, conversation: list[dict[str, str]], language: str):
        self.guard, self.conversation, self.language = guard, conversation, language
        self.verdict = Verdict("")
        self.sent = ""  # released text, after redaction
        self.raw_sent = 0  # characters of the raw answer released
        self.raw = ""
        self.checked_upto = 0
        classifier = guard.classifier
        self.classifying = bool(guard.rails.enabled and classifier and "output" in classifier.config.stages)
        self.chunk = classifier.config.stream_chunk_chars if self.classifying else 0  # type: ignore[union-attr]

    def feed(self, delta: str) -> str:
        if self.verdict.blocked or not delta:
            return ""
        self.raw += delta
        if not self.guard.rails.enabled:
            self.raw_sent = len(self.raw)
            return delta
        pending = self.raw[self.raw_sent:]
        hold = self.HOLD.search(pending)
        cut = hold.start() if hold else len(pending)
        if cut < self.chunk:
            return ""
        return self._release(cut, final=False)

    def finish(self) -> str:
        """The rest of the answer once the model is done (or "" when blocked)."""
        if self.verdict.blocked or not self.guard.rails.enabled:
            return ""
        return self._release(len(self.raw) - self.raw_sent, final=True)

    def _release(self, cut: int, final: bool) -> str:
        pending = self.raw[self.raw_sent:]
        stage = "output"
        window_start = max(0, self.checked_upto - 200)  # phrase rules see some text before the new piece
        findings = self.guard._text_rules(stage, self.raw[window_start:self.raw_sent + cut])
        self.checked_upto = self.raw_sent + cut
        pii = self.guard._pii(stage, pending[:cut])  # HOLD kept any entity still being written after `cut`
        seen = {(f.rule, f.category) for f in self.verdict.findings}
        self.verdict.findings += [f for f in findings if (f.rule, f.category) not in seen] + pii
        self.guard._decide(self.verdict, stage, self.language)
        if not self.verdict.blocked and self.classifying:
            answer = {"role": "assistant", "content": self.sent + pending[:cut]}
            self.guard._classify(self.verdict, stage, [*self.conversation, answer], "Agent", self.language)
        if self.verdict.blocked:
            return ""
        text = _redacted(pending[:cut], pii)
        self.raw_sent += cut
        self.sent += text
        return text


# ------------------------------------------------------------------------------------------------
# Guards per persona, shared classifiers

def merged_rails(settings: Settings, persona: Any = None) -> RailsSettings:
    """The config's `guard`, with a persona's own `guard` settings laid over it."""
    if persona is None or persona.guard is None:
        return settings.guard
    base = settings.guard.model_dump()
    _deep_update(base, persona.guard.model_dump(exclude_unset=True))
    return RailsSettings.model_validate(base)


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "refusals":
            _deep_update(base[key], value)
        else:
            base[key] = value


class Guards:
    """One Guard per persona (built on first use), sharing safety classifiers that have the same settings."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._guards: dict[tuple[str | None, tuple[str, ...]], Guard] = {}
        self._classifiers: dict[str, SafetyClassifier] = {}

    def for_persona(self, persona: Any = None, published: tuple[str, ...] = ()) -> Guard:
        """The persona's Guard; `published` values (the contact data a model's own training answers give,
        see `published_pii`) are allowed on top of its `pii.allow`."""
        key = (persona.name if persona is not None else None, published)
        if key not in self._guards:
            rails = merged_rails(self.settings, persona)
            if published:
                rails = rails.model_copy(update={"pii": rails.pii.model_copy(update={"allow": [*rails.pii.allow, *published]})})
            classifier = None
            if rails.safety is not None:
                ident = rails.safety.model_dump_json()
                classifier = self._classifiers.setdefault(ident, SafetyClassifier(rails.safety, self.settings))
            self._guards[key] = Guard(rails, classifier, persona.system if persona is not None else None)
        return self._guards[key]

    def redact(self, value: Any) -> Any:
        """`value` redacted for storing with the top-level settings (see Guard.redact)."""
        return self.for_persona().redact(value)

    def redact_arguments(self, value: Any) -> Any:
        return self.for_persona().redact_arguments(value)

    def close(self) -> None:
        """Stop the engines of local safety classifiers."""
        for classifier in self._classifiers.values():
            classifier.close()


# ------------------------------------------------------------------------------------------------
# A labelled file: how well the rails separate safe from unsafe (`forja guard test`)


@dataclass
class LabelledRow:
    line: int
    text: str
    unsafe: bool
    category: str | None
    stage: str = "input"


def read_labelled(path: Path) -> list[LabelledRow]:
    """JSONL or CSV rows with `text`, `label` (safe or unsafe) and optionally `category` (S1-S14,
    injection, blocklist, pii, ...) and `stage` (input, the default, or output)."""
    import csv
    import json

    if not path.is_file():
        raise GuardError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                raw = [(i + 2, row) for i, row in enumerate(csv.DictReader(handle))]
        else:
            raw = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        raw.append((number, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise GuardError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise GuardError(f"{path}: cannot read ({exc})") from None
    rows = []
    for number, row in raw:
        if not isinstance(row, dict):
            raise GuardError(f"{path} line {number}: expected an object with 'text' and 'label'")
        text, label = row.get("text"), str(row.get("label") or "").strip().lower()
        if not isinstance(text, str) or not text.strip():
            raise GuardError(f"{path} line {number}: field 'text' is missing or empty")
        if label not in ("safe", "unsafe"):
            raise GuardError(f"{path} line {number}: field 'label' must be 'safe' or 'unsafe', not {row.get('label')!r}")
        category = (row.get("category") or "").strip() or None
        if category and category not in SAFETY_CATEGORIES and category not in RAIL_CATEGORIES:
            raise GuardError(f"{path} line {number}: field 'category' {category!r} is not one of S1-S14, "
                             f"{', '.join(RAIL_CATEGORIES)}")
        stage = (row.get("stage") or "input").strip()
        if stage not in ("input", "output"):
            raise GuardError(f"{path} line {number}: field 'stage' must be 'input' or 'output', not {stage!r}")
        rows.append(LabelledRow(number, text, label == "unsafe", category, stage))
    if not rows:
        raise GuardError(f"{path}: no rows")
    return rows


def evaluate_labelled(guard: Guard, rows: list[LabelledRow]) -> dict[str, Any]:
    """Run every row through the rails: block rate of the unsafe rows (recall), pass rate of the safe
    ones, and precision/recall per category (a row counts for a category when it was blocked for it)."""
    results = []
    for row in rows:
        if row.stage == "input":
            verdict = guard.check_input([{"role": "user", "content": row.text}])
        else:
            verdict = guard.check_output(row.text, [{"role": "user", "content": "?"}])
        results.append((row, verdict))
    unsafe = [v.blocked for r, v in results if r.unsafe]
    safe = [not v.blocked for r, v in results if not r.unsafe]
    blocked = sum(unsafe) + sum(not ok for ok in safe)
    categories: dict[str, dict[str, Any]] = {}
    for row, verdict in results:
        predicted = set(verdict.categories) if verdict.blocked else set()
        expected = {row.category} if row.unsafe and row.category else set()
        for category in predicted | expected:
            counts = categories.setdefault(category, {"support": 0, "tp": 0, "fp": 0, "fn": 0})
            counts["support"] += category in expected
            counts["tp"] += category in expected and category in predicted
            counts["fp"] += category in predicted and category not in expected
            counts["fn"] += category in expected and category not in predicted
    for counts in categories.values():
        counts["precision"] = _ratio(counts["tp"], counts["tp"] + counts["fp"])
        counts["recall"] = _ratio(counts["tp"], counts["tp"] + counts["fn"])
    return {
        "rows": len(rows), "unsafe": len(unsafe), "safe": len(safe),
        "unsafe_blocked": _ratio(sum(unsafe), len(unsafe)),  # recall of the rails as a whole
        "safe_passed": _ratio(sum(safe), len(safe)),
        "precision": _ratio(sum(unsafe), blocked),
        "redacted": sum(any(f.action == "redact" for f in v.findings) for _, v in results),
        "categories": dict(sorted(categories.items(), key=lambda kv: _category_order(kv[0]))),
        "mistakes": [{"line": r.line, "label": "unsafe" if r.unsafe else "safe", "category": r.category,
                      "blocked_for": v.categories, "text": r.text} for r, v in results if v.blocked != r.unsafe],
    }


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _category_order(category: str) -> tuple[int, int | str]:
    return (0, int(category[1:])) if category in SAFETY_CATEGORIES else (1, category)
