"""Chat exports as conversations: WhatsApp's .txt (the iOS and Android forms) and Telegram's result.json.

`forja data prepare chat.txt --assistant "Ferretería" --out train.jsonl`: the named participant speaks as the
assistant, everyone else as the user; one side's messages in a row are one turn, and a pause longer than
--gap-hours (6) starts a new conversation. Media, deleted messages and the app's own notices are dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from forja.data import DIALOGUE, DataError, ReadOptions, _clean, _File, _fold, _Record

DEFAULT_GAP_HOURS = 6.0

_DATE = r"(?P<date>\d{1,2}[./-]\d{1,2}[./-]\d{2,4})"
_TIME = r"(?P<time>\d{1,2}:\d{2}(?::\d{2})?(?:\s?[ap]\.?\s?m\.?)?)"
# iOS: "[12/03/24 10:15:00] Ana: text" (some locales put a comma after the date); Android:
# "12/3/24, 10:15 - Ana: text". Either may say "10:15 a. m." or "10:15 PM".
IOS_LINE = re.compile(rf"\[{_DATE},?\s{_TIME}\]\s(?P<rest>.*)", re.IGNORECASE)
ANDROID_LINE = re.compile(rf"{_DATE},?\s{_TIME}\s[-–]\s(?P<rest>.*)", re.IGNORECASE)
# What WhatsApp writes for what it left out of the export, in its English and Spanish forms; iOS also
# starts attachments and its notices ("Messages and calls are end-to-end encrypted") with U+200E.
MEDIA = re.compile(
    r"<?(?:multimedia omitido|media omitted|archivo omitido|imagen omitida|image omitted|video omitted|"
    r"v[ií]deo omitido|audio omitted|audio omitido|sticker omitted|sticker omitido|gif omitted|gif omitido|"
    r"document omitted|documento omitido|contact card omitted|tarjeta de contacto omitida|null|"
    r"this message was deleted|you deleted this message|este mensaje fue eliminado|se elimin[oó] este mensaje|"
    r"eliminaste este mensaje|attached: .*|adjunto: .*|.* \((?:archivo adjunto|file attached)\))>?\.?",
    re.IGNORECASE,
)
EDITED = re.compile(r"\s*<(?:this message was edited|se edit[oó] este mensaje\.?)>\s*$", re.IGNORECASE)
LRM = "\u200e"


@dataclass
class Message:
    """One message of a chat, as the export has it."""

    when: datetime
    author: str
    text: str
    ref: str  # the line (WhatsApp) or message id (Telegram) it starts at, for the row's "source"


# --- WhatsApp ----------------------------------------------------------------------------------------


def is_whatsapp(text: str) -> bool:
    """The first line that is not blank starts with WhatsApp's date and time."""
    line = next((line for line in text.split("\n") if line.strip()), "").lstrip(LRM + "\ufeff ")
    return bool(IOS_LINE.match(line) or ANDROID_LINE.match(line))


def whatsapp(path: Path, text: str, options: ReadOptions, container: str, detail: str) -> _File:
    """A WhatsApp export's conversations, the participant named by options.assistant as the assistant."""
    starts: list[tuple[int, str, str, str]] = []  # line, date, time, rest
    pieces: list[list[str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        bare = line.lstrip(LRM)
        found = IOS_LINE.match(bare) or ANDROID_LINE.match(bare)
        if found:
            starts.append((number, found["date"], found["time"], found["rest"]))
            pieces.append([])
        elif pieces:
            pieces[-1].append(line)  # a message of several lines runs on until the next date
    day_first = _day_first([date for _, date, _, _ in starts])
    messages, notices, dropped = [], 0, 0
    for (number, date, time, rest), more in zip(starts, pieces):
        author, colon, body = rest.partition(": ")
        if not colon:  # "Ana created the group", "Messages are end-to-end encrypted" (Android)
            notices += 1
            continue
        body = EDITED.sub("", "\n".join([body, *more]))
        if body.lstrip().startswith(LRM) and not MEDIA.fullmatch(body.strip().strip(LRM)):
            notices += 1  # iOS marks its own notices this way
            continue
        if MEDIA.fullmatch(body.strip().strip(LRM)) or not body.strip():
            dropped += 1
            continue
        try:
            when = _when(date, time, day_first)
        except ValueError:
            raise DataError(f"{path} line {number}: cannot read the date {date} {time}; is this a WhatsApp export?") from None
        messages.append(Message(when, author.strip(LRM + " "), body, str(number)))
    notes = [f"{dropped} media or deleted messages dropped"] if dropped else []
    if notices:
        notes.append(f"{notices} WhatsApp notices dropped")
    return _conversations(path, [messages], options, container, "whatsapp", detail, notes, "WhatsApp chat")


def whatsapp_zip(path: Path, options: ReadOptions) -> _File:
    """The chat in a WhatsApp export zip (iOS: _chat.txt beside the media files)."""
    import zipfile

    from forja.data import decode

    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.lower().endswith(".txt") and not n.startswith("__MACOSX")]
            name = next((n for n in names if Path(n).name == "_chat.txt"), names[0] if len(names) == 1 else None)
            if name is None:
                raise DataError(f"{path}: a zip without a WhatsApp chat (_chat.txt) in it; forja reads a zip only as a "
                                "WhatsApp export")
            data = archive.read(name)
    except zipfile.BadZipFile as error:
        raise DataError(f"{path}: cannot read as a zip ({error})") from None
    text, detail = decode(path, data, options.encoding)
    if not is_whatsapp(text):
        raise DataError(f"{path}: {name} in the zip is not a WhatsApp chat (its first line has no date and time)")
    return whatsapp(path, text, options, "WhatsApp zip", detail)


def _day_first(dates: list[str]) -> bool:
    """Whether dates read day/month (most of the world) or month/day (the US), from one > 12 in either place."""
    for date in dates:
        first, second = (int(n) for n in re.split(r"[./-]", date)[:2])
        if first > 12:
            return True
        if second > 12:
            return False
    return True


def _when(date: str, time: str, day_first: bool) -> datetime:
    a, b, year = (int(n) for n in re.split(r"[./-]", date))
    day, month = (a, b) if day_first else (b, a)
    year += 2000 if year < 100 else 0
    clock = re.match(r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s?([ap])?", time.lower())
    hour, minute, second = int(clock[1]), int(clock[2]), int(clock[3] or 0)
    if clock[4]:  # 12-hour clock: 12 a. m. is midnight, 12 p. m. noon
        hour = hour % 12 + (12 if clock[4] == "p" else 0)
    return datetime(year, month, day, hour, minute, second)


# --- Telegram ----------------------------------------------------------------------------------------


def is_telegram(value: Any) -> bool:
    """Telegram Desktop's result.json: one chat with "messages", or a whole account with "chats": {"list"}."""
    if not isinstance(value, dict):
        return False
    chats = value.get("chats", {}).get("list") if isinstance(value.get("chats"), dict) else [value]
    return isinstance(chats, list) and any(
        isinstance(chat, dict) and isinstance(chat.get("messages"), list)
        and any(isinstance(m, dict) and "date" in m and "type" in m and "role" not in m for m in chat["messages"])
        for chat in chats
    )


def telegram(path: Path, value: dict[str, Any], options: ReadOptions, container: str, detail: str) -> _File:
    """A Telegram export's conversations; each chat of a whole-account export is read on its own."""
    chats = value["chats"]["list"] if isinstance(value.get("chats"), dict) else [value]
    threads, dropped = [], 0
    for chat in chats:
        messages = []
        for message in chat.get("messages") or []:
            if not isinstance(message, dict) or message.get("type") != "message":
                continue  # "service": joined, pinned, called...
            text = _telegram_text(message.get("text"))
            if not text.strip():
                dropped += 1  # a photo, sticker, voice note or file without a caption
                continue
            try:
                when = datetime.fromisoformat(str(message["date"]))
            except (KeyError, ValueError):
                raise DataError(f'{path} message {message.get("id")}: "date" is not an ISO date '
                                f"({message.get('date')!r}); is this Telegram's result.json?") from None
            author = str(message.get("from") or message.get("from_id") or "Deleted Account")
            messages.append(Message(when, author, text, str(message.get("id", len(messages) + 1))))
        threads.append(messages)
    notes = [f"{dropped} messages without text (media) dropped"] if dropped else []
    return _conversations(path, threads, options, container, "telegram", detail, notes, "Telegram export")


def _telegram_text(text: Any) -> str:
    """"text" is a string, or a list of strings and entities ({"type": "bold", "text": ...}) to join."""
    if isinstance(text, list):
        return "".join(part if isinstance(part, str) else str(part.get("text", "")) for part in text
                       if isinstance(part, (str, dict)))
    return text if isinstance(text, str) else ""


# --- Messages into conversations ---------------------------------------------------------------------


def _conversations(
    path: Path, threads: list[list[Message]], options: ReadOptions, container: str, fmt: str, detail: str,
    notes: list[str], what: str,
) -> _File:
    """Turns from messages: the assistant's side and the user's, one turn per run of one side, a new
    conversation after a long pause; a conversation starts with the user and ends with the assistant."""
    participants = list(dict.fromkeys(m.author for thread in threads for m in thread))
    named = ", ".join(f'"{p}"' for p in participants) or "none"
    if not options.assistant:
        counts = Counter(m.author for thread in threads for m in thread)
        sizes = ", ".join(f'"{p}" ({counts[p]} messages)' for p in participants) or "nobody"
        raise DataError(f"{path}: a {what} of {sizes}; say which one is the assistant with --assistant NAME")
    assistant = _fold(options.assistant.strip())
    if not any(_fold(p) == assistant for p in participants):
        raise DataError(f'{path}: --assistant "{options.assistant}" names nobody in the chat; the participants are '
                        f"{named}")
    gap = (options.gap_hours or DEFAULT_GAP_HOURS) * 3600
    records, unanswered = [], 0
    for thread in threads:
        current: list[tuple[str, list[str], str]] = []  # role, texts, ref
        groups = [current]
        for previous, message in zip([None, *thread], thread):
            if previous is not None and (message.when - previous.when).total_seconds() > gap:
                current = []
                groups.append(current)
            role = "assistant" if _fold(message.author) == assistant else "user"
            if current and current[-1][0] == role:
                current[-1][1].append(message.text)
            else:
                current.append((role, [message.text], message.ref))
        for group in groups:
            turns = group
            while turns and turns[0][0] == "assistant":  # the business writing first: nothing asked yet
                turns = turns[1:]
            while turns and turns[-1][0] == "user":  # a question left unanswered teaches nothing
                turns = turns[:-1]
            if not turns:
                unanswered += bool(group)
                continue
            messages = [{"role": role, "content": _clean("\n".join(texts))} for role, texts, _ in turns]
            records.append(_Record(f"{path}:{turns[0][2]}", messages=messages))
    others = [p for p in participants if _fold(p) != assistant]
    notes = [f'assistant: {next(p for p in participants if _fold(p) == assistant)}; user: '
             f'{", ".join(others) or "nobody"}; a pause over {gap / 3600:g} h starts a new conversation', *notes]
    if unanswered:
        notes.append(f"{unanswered} stretches without both sides left out")
    return _File(path, container, fmt, DIALOGUE, records, [], detail, "", notes)
